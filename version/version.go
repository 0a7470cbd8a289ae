// Package version holds the build's version, set by the Makefile with -ldflags -X.
package version

var (
	// Version is the release or `git describe` of the build.
	Version = "dev"
	// Revision is the git commit of the build.
	Revision = "unknown"
)

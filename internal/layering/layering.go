// Package layering holds no code: its tests keep the repository's package
// arrows pointing the way docs/architecture.md draws them, and the shim's core
// in functions a reader can hold in their head.
package layering

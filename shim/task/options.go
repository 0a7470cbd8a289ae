package task

import (
	"fmt"

	runcoptions "github.com/containerd/containerd/api/types/runc/options"
	runtimeoptions "github.com/containerd/containerd/api/types/runtimeoptions/v1"
	"github.com/containerd/errdefs"
	"github.com/containerd/typeurl/v2"
	"google.golang.org/protobuf/types/known/anypb"
)

// runtimeOptions returns the configuration file named in the runtime options
// containerd passes: the CRI's generic runtimeoptions (runtime handler
// `options = { ConfigPath = "..." }`, or `ctr --runtime-config-path`). runc's
// options, which some clients send to any runtime, name no file: the default applies.
func runtimeOptions(a *anypb.Any) (string, error) {
	v, err := typeurl.UnmarshalAny(a)
	if err != nil {
		return "", fmt.Errorf("runtime options of type %s: %v: %w", a.GetTypeUrl(), err, errdefs.ErrInvalidArgument)
	}
	switch o := v.(type) {
	case *runtimeoptions.Options:
		if len(o.ConfigBody) > 0 {
			return "", fmt.Errorf("runtime option ConfigBody is not supported; use ConfigPath: %w", errdefs.ErrInvalidArgument)
		}
		return o.ConfigPath, nil
	case *runcoptions.Options:
		return "", nil
	}
	return "", fmt.Errorf("runtime options of type %T are not Caisson's (want ConfigPath): %w", v, errdefs.ErrInvalidArgument)
}

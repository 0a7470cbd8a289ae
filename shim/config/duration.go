package config

import (
	"fmt"
	"time"

	"github.com/containerd/errdefs"
)

// Duration is a time.Duration written in TOML as a Go duration string ("2s",
// "500ms", "0").
type Duration time.Duration

func (d Duration) String() string { return time.Duration(d).String() }

// MarshalText writes d as a Go duration string.
func (d Duration) MarshalText() ([]byte, error) { return []byte(d.String()), nil }

// UnmarshalText reads a Go duration string.
func (d *Duration) UnmarshalText(b []byte) error {
	v, err := time.ParseDuration(string(b))
	if err != nil {
		return fmt.Errorf("want a duration such as \"2s\" or \"500ms\": %v: %w", err, errdefs.ErrInvalidArgument)
	}
	*d = Duration(v)
	return nil
}

// Package tomlconfig decodes Caisson's TOML configuration files strictly: a key
// the configuration struct does not have is an error that names it, so a typo
// is reported instead of silently keeping a default.
package tomlconfig

import (
	"bytes"
	"errors"
	"fmt"
	"strings"

	"github.com/containerd/errdefs"
	"github.com/pelletier/go-toml/v2"
)

// DecodeStrict decodes data into v, which should already hold the defaults.
// Errors wrap errdefs.ErrInvalidArgument.
func DecodeStrict(data []byte, v any) error {
	dec := toml.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	err := dec.Decode(v)
	if err == nil {
		return nil
	}
	var missing *toml.StrictMissingError
	if errors.As(err, &missing) {
		keys := make([]string, 0, len(missing.Errors))
		for _, e := range missing.Errors {
			row, col := e.Position()
			keys = append(keys, fmt.Sprintf("%q (line %d, column %d)", strings.Join(e.Key(), "."), row, col))
		}
		return fmt.Errorf("unknown configuration key %s: %w", strings.Join(keys, ", "), errdefs.ErrInvalidArgument)
	}
	var de *toml.DecodeError
	if errors.As(err, &de) {
		row, col := de.Position()
		return fmt.Errorf("line %d, column %d: %s: %w", row, col, de.Error(), errdefs.ErrInvalidArgument)
	}
	return fmt.Errorf("%v: %w", err, errdefs.ErrInvalidArgument)
}

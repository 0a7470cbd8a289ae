package tomlconfig

import (
	"strings"
	"testing"

	"github.com/containerd/errdefs"
)

type sample struct {
	Name  string `toml:"name"`
	Inner struct {
		Size int `toml:"size"`
	} `toml:"inner"`
}

func TestDecodeStrict(t *testing.T) {
	for _, tc := range []struct {
		name, doc string
		wantErr   []string // substrings; nil means success
	}{
		{name: "valid", doc: "name = \"a\"\n[inner]\nsize = 3\n"},
		{name: "empty keeps defaults", doc: ""},
		{name: "unknown top key", doc: "nmae = \"a\"\n", wantErr: []string{`"nmae"`, "line 1"}},
		{name: "unknown nested keys", doc: "[inner]\nsize = 1\nsise = 2\ncolour = 3\n", wantErr: []string{`"inner.sise"`, `"inner.colour"`}},
		{name: "wrong type", doc: "[inner]\nsize = \"big\"\n", wantErr: []string{"line 2"}},
		{name: "not toml", doc: "name = \n", wantErr: []string{"line 1"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v := sample{Name: "default"}
			err := DecodeStrict([]byte(tc.doc), &v)
			if tc.wantErr == nil {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if !errdefs.IsInvalidArgument(err) {
				t.Fatalf("error %v, want InvalidArgument", err)
			}
			for _, w := range tc.wantErr {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not mention %s", err, w)
				}
			}
		})
	}
}

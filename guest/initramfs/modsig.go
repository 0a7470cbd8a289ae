package initramfs

import (
	"bytes"
	"encoding/binary"
	"fmt"

	"github.com/containerd/errdefs"
)

// moduleSigMagic ends a signed kernel module: the signature, then a struct
// module_signature, then this marker (the kernel's include/linux/module_signature.h).
const moduleSigMagic = "~Module signature appended~\n"

// moduleSigInfoLen is the size of struct module_signature: algo, hash, id_type,
// signer_len, key_id_len, three bytes of padding and a big-endian sig_len.
const moduleSigInfoLen = 12

// StripModuleSignature returns the module ko without its appended signature (ko itself if
// it has none).
//
// The guest kernel checks a signed module's signature when it loads it (RSA and SHA-256,
// under TCG a few milliseconds a module) but, not built with MODULE_SIG_FORCE, loads an
// unsigned one as well (and marks itself tainted, "E"). The check protects nothing here:
// the modules come in the same initramfs as the init that loads them, from the host that
// chose the kernel.
func StripModuleSignature(ko []byte) ([]byte, error) {
	if !bytes.HasSuffix(ko, []byte(moduleSigMagic)) {
		return ko, nil
	}
	end := len(ko) - len(moduleSigMagic)
	if end < moduleSigInfoLen {
		return nil, fmt.Errorf("module signature trailer: %w", errdefs.ErrInvalidArgument)
	}
	info := ko[end-moduleSigInfoLen : end]
	sigLen := int(binary.BigEndian.Uint32(info[8:]))
	end -= moduleSigInfoLen
	if sigLen > end {
		return nil, fmt.Errorf("module signature of %d bytes in a %d-byte module: %w", sigLen, len(ko), errdefs.ErrInvalidArgument)
	}
	return ko[:end-sigLen], nil
}

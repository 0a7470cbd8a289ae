# The guest image: kernel, initramfs, and the static caisson-agent that is its /init.
# Outputs: $(GUEST_DIR)/vmlinux, the kernel as the uncompressed ELF that QEMU boots directly
# (PVH), extracted from the package's bzImage; $(GUEST_DIR)/initramfs.cpio.lz4 (and debug/
# for guest-debug; LZ4-compressed despite the name, which the shim's configuration uses); and
# $(GUEST_DIR)/modules.erofs, every module of the kernel, which the shim attaches to each
# pod VM beside the kernel for the guest to load on demand (see docs/guest.md).
# Everything is rebuilt only when an input changes, and the same inputs give the same bytes.

GUEST_KERNEL_DIR := $(GUEST_DIR)/kernel
GUEST_BUILD_DIR  := $(GUEST_DIR)/build
GUEST_MODULES_DIR := $(GUEST_KERNEL_DIR)/root/lib/modules/$(GUEST_KERNEL_RELEASE)
GUEST_MODULES_DEP := $(GUEST_BUILD_DIR)/depmod/lib/modules/$(GUEST_KERNEL_RELEASE)/modules.dep

# Modules the image carries (their modules.dep closure comes along, without signatures,
# with the image's own modules.dep). The agent loads its transport's channel (PCI and
# virtio-serial, or vsock) before it serves and not the other's; then, in the background,
# disks and DAX pmem, the layers' filesystems, the pod's network, and the balloon through
# which the guest reports the memory it frees (hypervisor.free_page_reporting).
GUEST_MODULES ?= virtio_pci virtio_console vmw_vsock_virtio_transport \
	virtio_blk virtio_pmem nd_pmem erofs overlay virtio_net virtio_rng virtiofs virtio_balloon
GUEST_BUSYBOX ?= /bin/busybox

# The agent is a static cgo binary: runc's libcontainer needs its nsenter constructor (C),
# and seccomp filters need libseccomp. netgo/osusergo keep glibc's NSS out of the static link.
AGENT_TAGS    := seccomp netgo osusergo
# The version Sandbox.Version reports names the last commit that changed the agent's
# sources (and -dirty while they have uncommitted changes), not the repository's HEAD:
# commits elsewhere in the tree leave the image as it is.
AGENT_SOURCES := guest cmd/caisson-agent api internal go.mod go.sum
AGENT_VERSION ?= $(shell git log -1 --format=%h -- $(AGENT_SOURCES) 2>/dev/null || echo dev)$(shell \
	git diff --quiet HEAD -- $(AGENT_SOURCES) 2>/dev/null || echo -dirty)
AGENT_LDFLAGS := -s -w -buildid= -linkmode external -extldflags '-static' \
	-X $(PKG)/guest/agent/service.Version=$(AGENT_VERSION)

.PHONY: guest
guest: $(GUEST_DIR)/vmlinux $(GUEST_DIR)/initramfs.cpio.lz4 $(GUEST_DIR)/modules.erofs ## Build the guest kernel, initramfs (agent as /init, no shell) and modules image

.PHONY: guest-debug
guest-debug: $(GUEST_DIR)/vmlinux $(GUEST_DIR)/debug/initramfs.cpio.lz4 ## Build the debug initramfs (adds busybox) into _output/guest/debug

# Go decides whether the agent is out of date; the file is replaced only if its bytes
# change, so that the initramfs is not rebuilt for nothing.
$(BIN_DIR)/caisson-agent: FORCE
	@mkdir -p $(BIN_DIR)
	CGO_ENABLED=1 $(GO) build -trimpath -buildvcs=false -tags '$(AGENT_TAGS)' \
		-ldflags "$(AGENT_LDFLAGS)" -o $@.tmp ./cmd/caisson-agent
	@if cmp -s $@.tmp $@; then rm $@.tmp; else mv $@.tmp $@; fi

$(GUEST_KERNEL_DIR)/.stamp: guest/kernel/versions.mk guest/kernel/fetch.sh
	bash guest/kernel/fetch.sh $(GUEST_KERNEL_PACKAGE) $(GUEST_KERNEL_VERSION) $(GUEST_KERNEL_RELEASE) $(GUEST_KERNEL_DIR)
	@touch $@

# The pod VMs boot the vmlinux ELF, not the package's bzImage: no decompression in the
# guest at each boot, and QEMU maps the file instead of holding a copy per VM (docs/guest.md).
# The bzImage stays in $(GUEST_KERNEL_DIR) only as the source.
GUEST_VMLINUX_SRCS := $(filter-out %_test.go,$(wildcard guest/vmlinux/*.go guest/mkvmlinux/*.go))
$(GUEST_DIR)/vmlinux: $(GUEST_KERNEL_DIR)/.stamp $(GUEST_VMLINUX_SRCS)
	$(GO) run ./guest/mkvmlinux -kernel $(GUEST_KERNEL_DIR)/vmlinuz -o $@

# The package ships no modules.dep (its postinst runs depmod); compute it beside the tree.
$(GUEST_MODULES_DEP): $(GUEST_KERNEL_DIR)/.stamp
	rm -rf $(GUEST_BUILD_DIR)/depmod
	mkdir -p $(GUEST_BUILD_DIR)/depmod/lib/modules
	cp -al $(GUEST_MODULES_DIR) $(GUEST_BUILD_DIR)/depmod/lib/modules/
	depmod -b $(GUEST_BUILD_DIR)/depmod $(GUEST_KERNEL_RELEASE)

GUEST_INITRAMFS_SRCS := $(wildcard guest/initramfs/*.go guest/initramfs/moddep/*.go guest/mkinitramfs/*.go)
GUEST_MKINITRAMFS = $(GO) run ./guest/mkinitramfs -agent $(BIN_DIR)/caisson-agent \
	-release $(GUEST_KERNEL_RELEASE) -modules-dir $(GUEST_MODULES_DIR) -modules-dep $(GUEST_MODULES_DEP) \
	-modules $(subst $(eval) ,$(comma),$(strip $(GUEST_MODULES)))
comma := ,

$(GUEST_DIR)/initramfs.cpio.lz4: $(BIN_DIR)/caisson-agent $(GUEST_MODULES_DEP) $(GUEST_INITRAMFS_SRCS) guest/guest.mk
	$(GUEST_MKINITRAMFS) -o $@
	@echo "initramfs: $$(stat -c %s $@) bytes"

$(GUEST_DIR)/debug/initramfs.cpio.lz4: $(BIN_DIR)/caisson-agent $(GUEST_MODULES_DEP) $(GUEST_INITRAMFS_SRCS) guest/guest.mk
	@mkdir -p $(dir $@)
	$(GUEST_MKINITRAMFS) -busybox $(GUEST_BUSYBOX) -o $@
	@echo "debug initramfs: $$(stat -c %s $@) bytes"

# The kernel's whole module tree with depmod's files, as a read-only EROFS (2 MiB-aligned
# for virtio-pmem); the initramfs carries only GUEST_MODULES.
GUEST_MODIMAGE_SRCS := $(wildcard guest/modimage/*.go guest/mkmodules/*.go guest/initramfs/modsig.go)
$(GUEST_DIR)/modules.erofs: $(GUEST_MODULES_DEP) $(GUEST_MODIMAGE_SRCS) guest/guest.mk
	$(GO) run ./guest/mkmodules -dir $(dir $(GUEST_MODULES_DEP)) -release $(GUEST_KERNEL_RELEASE) -o $@

# Comparisons in the same run, e.g.
# make bench-guest GUEST_BENCH_ARGS="-guest.compare-initramfs old=/tmp/old.cpio.gz -guest.compare-params 'notests=cryptomgr.notests'"
GUEST_BENCH_ARGS ?=

.PHONY: bench-guest
bench-guest: guest ## Guest boot benchmark: agent-ready vs a trivial init (wall and CPU ratios), agent RSS, initramfs size
	$(GO) test -count=1 -run '^$$' -bench GuestBoot -benchtime 7x ./guest/test -args $(GUEST_BENCH_ARGS)

.PHONY: bench-guest-calls
bench-guest-calls: guest ## Guest instructions per Stats and per Check call, less the idle guest's (a TCG plugin built with gcc), and their ratio
	$(GO) test -count=1 -tags seccomp -run '^$$' -bench GuestCallInstructions -benchtime 1x ./guest/test -args $(GUEST_BENCH_ARGS)

.PHONY: test-guest
test-guest: guest ## Guest tests: the agent's packages on the host, then the image booted under QEMU (root)
	$(GO) test -count=1 -tags seccomp ./guest/... ./cmd/caisson-agent/...

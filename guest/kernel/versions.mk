# The guest kernel: Debian 12's cloud kernel. This is the one place its version is pinned.
# `apt-get download` fetches exactly this package version; bump both together.
GUEST_KERNEL_PACKAGE ?= linux-image-6.1.0-56-cloud-amd64
GUEST_KERNEL_VERSION ?= 6.1.192-2
# The kernel release (uname -r) inside the package.
GUEST_KERNEL_RELEASE ?= 6.1.0-56-cloud-amd64

package critest

import (
	"archive/tar"
	"bytes"
	"debug/elf"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/mutate"

	"github.com/caisson-containers/caisson/integration-tests/harness"
	"github.com/caisson-containers/caisson/internal/testutil"
)

// critest names its images by registry.k8s.io and gcr.io paths. Its --registry-prefix
// flag cannot stand in for them: it rewrites the name it pulls (keeping only the path,
// so every tag becomes latest) but not the name CreateContainer is given, which then
// names no image. Instead containerd mirrors those registries to a registry on
// 127.0.0.1 (mirrorRegistries) that serves, under critest's paths and tags, look-alikes
// built from Debian's dynamically linked busybox: each does what cri-tools' pkg/validate
// expects of the real image, and nothing else.
const (
	// defaultImage is the test images file's defaultTestContainerImage (busybox).
	defaultImage = "e2e-test-images/busybox:1.29-2"
	// webServerImage is the test images file's webServerTestImage and the image of
	// critest's own nginx and httpd names: a server answering 200 on port 80 whose
	// first process has "master process" in its command line, and which writes
	// /var/run/nginx.pid, as nginx does (security_context_linux.go's PID tests).
	webServerImage = "e2e-test-images/nginx:1.14-2"
	httpdImage     = "e2e-test-images/httpd:2.4.39-4"
	// hostNetImage serves on port 12003 (consts_linux.go's webServerHostNetContainerPort).
	hostNetImage = "k8s-staging-cri-tools/hostnet-nginx-amd64:latest"
	// noNewPrivsImage runs a set-user-ID root program that prints its effective uid.
	noNewPrivsImage = "e2e-test-images/nonewprivs:1.3"
	// preDefinedGroupImage: user default-user (1000) is a member of group 50000 in
	// its /etc/group (the SupplementalGroupsPolicy tests).
	preDefinedGroupImage = "k8s-staging-cri-tools/test-image-predefined-group:latest"
	// pauseImage is pulled from registry.k8s.io and k8s.gcr.io (Image Identifier
	// Consistency): the same image, so the same id, from both.
	pauseImage = "pause:3.9"
	// tagImage is the image of the Image Volume tests.
	tagImage = "k8s-staging-cri-tools/test-image-tag:test"
	// sandboxImage is containerd's sandbox (pause) image in critest's runs: ./pause, so
	// that the pods' PID 1 is named pause as in Kubernetes, not sleep as the harness's
	// is. A name and an image of its own, apart from pauseImage, which critest pulls
	// and removes.
	sandboxImage = "caisson-test/critest-pause:1"
)

// pushImages builds the look-alikes and pushes them into reg.
func pushImages(t *testing.T, reg *harness.Registry) {
	t.Helper()
	base := busyboxLayer(t)
	mtime := time.Unix(1700000000, 0)
	busybox := harness.Image(t, []v1.Layer{base}, "sh")
	for _, ref := range []string{defaultImage, tagImage, pauseImage} {
		reg.Push(t, ref, busybox)
	}

	server := func(port int) v1.Image {
		script := "#!/bin/sh\n" +
			"# nginx look-alike: its pid in /var/run/nginx.pid, busybox httpd on the port, and this\n" +
			"# script (comm \"nginx\", for pidof) kept running as the container's first process.\n" +
			"echo $$ > /var/run/nginx.pid\n" +
			"echo \"nginx look-alike: httpd serving port " + strconv.Itoa(port) + "\"\n" +
			"httpd -p " + strconv.Itoa(port) + " -h /usr/share/nginx/html\n" +
			"while :; do sleep 3600; done\n"
		l := tarLayer(t, func(tw *tar.Writer) {
			for _, d := range []string{"usr/", "usr/share/", "usr/share/nginx/", "usr/share/nginx/html/", "var/", "var/run/"} {
				tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: d, Mode: 0o755, ModTime: mtime})
			}
			writeFile(tw, "usr/share/nginx/html/index.html", 0o644, []byte("<h1>Welcome to nginx!</h1>\n"), mtime)
			writeFile(tw, "bin/nginx", 0o755, []byte(script), mtime)
		})
		return harness.Image(t, []v1.Layer{base, l}, "/bin/nginx", "nginx: master process")
	}
	web := server(80)
	for _, ref := range []string{webServerImage, httpdImage} {
		reg.Push(t, ref, web)
	}
	reg.Push(t, hostNetImage, server(12003))

	nnp := buildStatic(t, "./integration-tests/critest/nonewprivs")
	nnpLayer := tarLayer(t, func(tw *tar.Writer) {
		writeFile(tw, "bin/nonewprivs", 0o4755, nnp, mtime)
	})
	reg.Push(t, noNewPrivsImage, harness.Image(t, []v1.Layer{base, nnpLayer}, "/bin/nonewprivs"))

	pause := buildStatic(t, "./integration-tests/critest/pause")
	pauseLayer := tarLayer(t, func(tw *tar.Writer) {
		for _, d := range []string{"dev/", "proc/", "sys/", "etc/"} {
			tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: d, Mode: 0o755, ModTime: mtime})
		}
		writeFile(tw, "pause", 0o755, pause, mtime)
	})
	reg.Push(t, sandboxImage, harness.Image(t, []v1.Layer{pauseLayer}, "/pause"))

	groupLayer := tarLayer(t, func(tw *tar.Writer) {
		writeFile(tw, "etc/passwd", 0o644, []byte("root:x:0:0:root:/root:/bin/sh\ndefault-user:x:1000:1000::/tmp:/bin/sh\n"), mtime)
		writeFile(tw, "etc/group", 0o644, []byte("root:x:0:\ndefault-user:x:1000:\ngroup-defined-in-image:x:50000:default-user\n"), mtime)
	})
	img := harness.Image(t, []v1.Layer{base, groupLayer}, "sh")
	img = withUser(t, img, "1000")
	reg.Push(t, preDefinedGroupImage, img)
}

// busyboxLayer is Debian's dynamically linked busybox with the host's libraries it
// links to and every applet it has linked into /bin (critest's commands use top,
// pidof, httpd and more than the harness's image links), the usual top-level
// directories, and users root, nobody and www-data.
//
// Not busybox-static, which the harness's images use: Debian builds it with
// FEATURE_SH_STANDALONE, so its sh runs applets such as ls in its own process
// whatever is at /bin/ls, and critest's MaskedPaths spec, which masks /bin/ls and
// expects `sh -c ls` to fail with "/bin/sh: ls: Permission denied", failed on runc
// too. The real busybox image's sh execs ls from the PATH, as this one does.
func busyboxLayer(t *testing.T) v1.Layer {
	t.Helper()
	bbPath := filepath.Join(testutil.RepoRoot(t), "_output", "tools", "busybox", "bin", "busybox")
	bb, err := os.ReadFile(bbPath)
	if err != nil {
		t.Fatalf("needs Debian's dynamically linked busybox at %s: run `make deps`, which unpacks it (%v)", bbPath, err)
	}
	libs := sharedLibraries(t, bbPath)
	out, err := exec.Command(bbPath, "--list").Output()
	if err != nil {
		t.Fatalf("%s --list: %v", bbPath, err)
	}
	mtime := time.Unix(1700000000, 0)
	return tarLayer(t, func(tw *tar.Writer) {
		for _, d := range []string{"bin/", "etc/", "tmp/", "proc/", "sys/", "dev/", "root/", "run/", "var/", "home/", "lib/", "lib/x86_64-linux-gnu/", "lib64/"} {
			mode := int64(0o755)
			if d == "tmp/" {
				mode = 0o1777
			}
			tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: d, Mode: mode, ModTime: mtime})
		}
		for _, l := range libs {
			writeFile(tw, l.name, 0o755, l.data, mtime)
		}
		writeFile(tw, "bin/busybox", 0o755, bb, mtime)
		for _, a := range strings.Fields(string(out)) {
			if a == "busybox" {
				continue
			}
			// Hard links, as in the busybox image: masking one applet's path
			// (MaskedPaths: /bin/ls) must leave the others working.
			tw.WriteHeader(&tar.Header{Typeflag: tar.TypeLink, Name: "bin/" + a, Linkname: "bin/busybox", ModTime: mtime, Mode: 0o755})
		}
		// Debian's busybox has neither pgrep (critest's checkSleepCmd) nor ipcs (its
		// IPC namespace tests): small scripts do what critest reads of them.
		writeFile(tw, "bin/pgrep", 0o755, []byte("#!/bin/sh\n# pgrep NAME: the pids of the processes whose command name is NAME.\nfound=1\n"+
			"for d in /proc/[0-9]*; do\n\t[ \"$(cat $d/comm 2>/dev/null)\" = \"$1\" ] && { echo \"${d#/proc/}\"; found=0; }\ndone\nexit $found\n"), mtime)
		writeFile(tw, "bin/ipcs", 0o755, []byte("#!/bin/sh\n# ipcs -m: the System V shared memory segments, from /proc/sysvipc/shm.\n"+
			"echo '------ Shared Memory Segments --------'\necho 'key        shmid      owner      perms      bytes      nattch     status'\n"+
			"awk 'NR > 1 { printf \"0x%08x %-10s %-10s %-10s %-10s %s\\n\", $1, $2, $8, $3, $4, $7 }' /proc/sysvipc/shm\n"), mtime)
		writeFile(tw, "etc/passwd", 0o644, []byte("root:x:0:0:root:/root:/bin/sh\nwww-data:x:33:33:www-data:/var/www:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n"), mtime)
		writeFile(tw, "etc/group", 0o644, []byte("root:x:0:\nwww-data:x:33:\nnogroup:x:65534:\n"), mtime)
	})
}

// libDirs are where Debian (amd64) keeps the libraries a program links to, and where
// the image's dynamic loader looks for them without an ld.so.cache.
var libDirs = []string{"/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu"}

type imageFile struct {
	name string // in the image, without the leading slash
	data []byte
}

// sharedLibraries returns what the dynamically linked program at path needs to run
// in an image: its dynamic loader (at the path the program names) and the host's
// copies of the libraries it links to (DT_NEEDED), in lib/x86_64-linux-gnu.
func sharedLibraries(t *testing.T, path string) []imageFile {
	t.Helper()
	f, err := elf.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var interp string
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			b, err := io.ReadAll(p.Open())
			if err != nil {
				t.Fatalf("%s: read its interpreter: %v", path, err)
			}
			interp = strings.TrimRight(string(b), "\x00")
		}
	}
	if interp == "" {
		t.Fatalf("%s names no dynamic loader (PT_INTERP): not a dynamically linked program", path)
	}
	needed, err := f.ImportedLibraries()
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	ld, err := os.ReadFile(interp)
	if err != nil {
		t.Fatalf("%s's dynamic loader: %v", path, err)
	}
	files := []imageFile{{name: strings.TrimPrefix(interp, "/"), data: ld}}
	for _, lib := range needed {
		var data []byte
		for _, dir := range libDirs {
			if data, err = os.ReadFile(filepath.Join(dir, lib)); err == nil {
				break
			}
		}
		if data == nil {
			t.Fatalf("%s links to %s, found in none of %v", path, lib, libDirs)
		}
		files = append(files, imageFile{name: "lib/x86_64-linux-gnu/" + lib, data: data})
	}
	return files
}

func withUser(t *testing.T, img v1.Image, user string) v1.Image {
	t.Helper()
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	cf = cf.DeepCopy()
	cf.Config.User = user
	img, err = mutate.ConfigFile(img, cf)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

// buildStatic builds the Go command at pkg (relative to the repository) as a static binary.
func buildStatic(t *testing.T, pkg string) []byte {
	t.Helper()
	bin := filepath.Join(t.TempDir(), filepath.Base(pkg))
	cmd := exec.Command("go", "build", "-o", bin, pkg)
	cmd.Dir = testutil.RepoRoot(t)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build %s: %v\n%s", pkg, err, out)
	}
	b, err := os.ReadFile(bin)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func tarLayer(t *testing.T, fill func(*tar.Writer)) v1.Layer {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	fill(tw)
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return harness.Layer(t, buf.Bytes())
}

func writeFile(tw *tar.Writer, name string, mode int64, b []byte, mtime time.Time) {
	tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: mode, Size: int64(len(b)), ModTime: mtime})
	tw.Write(b)
}

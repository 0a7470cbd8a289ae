// Command nerdctlhook behaves like `nerdctl internal oci-hook createRuntime|postStop`, the
// OCI hooks nerdctl puts in every container's spec, for what concerns the network (nerdctl
// itself is not on the Go module proxy, so the tests cannot run it). Like nerdctl's, it:
//
//   - reads the container's OCI state from stdin and takes what it needs from its
//     annotations: nerdctl/namespace, nerdctl/networks (a JSON list of network names;
//     "none" and "host" do nothing), nerdctl/ports (a JSON list of go-cni PortMappings);
//   - finds the container's network namespace through the state's pid, /proc/PID/ns/net;
//   - on createRuntime, first removes what a previous run may have left (nerdctl#3355), then
//     runs the networks' CNI conflists (from --cni-netconfpath, by their "name") with the
//     plugins in --cni-path, container id "<namespace>-<id>", interface eth0, the port
//     mappings as the portMappings capability; under a lock on the conf dir, as nerdctl;
//   - on postStop, runs CNI DEL with no network namespace (nerdctl's call: the container's
//     process is gone by then under runc).
//
// One difference: with no network namespace in DEL, the bridge plugin releases the address
// but keeps its ipMasq rules (containernetworking/plugins#810, containerd/nerdctl#1872,
// #3253; runc leaks them just the same). postStop removes them itself, from the addresses
// createRuntime recorded under --data-root, so that what the tests check after a delete is
// the runtime's cleanup, not that known leak.
package main

import (
	"context"
	"crypto/sha512"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/containerd/go-cni"
	"github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
)

// nerdctl's annotations (github.com/containerd/nerdctl/v2/pkg/labels).
const (
	annotationNamespace = "nerdctl/namespace"
	annotationNetworks  = "nerdctl/networks"
	annotationPorts     = "nerdctl/ports"
)

// ifName is the container's interface, as go-cni names the first network's.
const ifName = "eth0"

func main() {
	cniPath := flag.String("cni-path", "", "directory of the CNI plugins")
	confDir := flag.String("cni-netconfpath", "", "directory of the CNI conflists")
	dataRoot := flag.String("data-root", "", "where createRuntime records what postStop needs")
	flag.Parse()
	if flag.NArg() != 1 || *cniPath == "" || *confDir == "" || *dataRoot == "" {
		fmt.Fprintln(os.Stderr, "usage: nerdctlhook --cni-path DIR --cni-netconfpath DIR --data-root DIR createRuntime|postStop")
		os.Exit(2)
	}
	if err := run(flag.Arg(0), *cniPath, *confDir, *dataRoot); err != nil {
		fmt.Fprintf(os.Stderr, "nerdctlhook %s: %v\n", flag.Arg(0), err)
		os.Exit(1)
	}
}

func run(event, cniPath, confDir, dataRoot string) error {
	var state specs.State
	if err := json.NewDecoder(os.Stdin).Decode(&state); err != nil {
		return fmt.Errorf("decode the OCI state on stdin: %w", err)
	}
	ns := state.Annotations[annotationNamespace]
	if ns == "" || state.ID == "" {
		return errors.New("the state has no id or no nerdctl/namespace annotation")
	}
	fullID := ns + "-" + state.ID
	var networks []string
	if err := json.Unmarshal([]byte(state.Annotations[annotationNetworks]), &networks); err != nil {
		return fmt.Errorf("nerdctl/networks annotation: %w", err)
	}
	if len(networks) == 0 || networks[0] == "none" || networks[0] == "host" {
		return nil
	}
	var ports []cni.PortMapping
	if p := state.Annotations[annotationPorts]; p != "" {
		if err := json.Unmarshal([]byte(p), &ports); err != nil {
			return fmt.Errorf("nerdctl/ports annotation: %w", err)
		}
	}

	unlock, err := lock(confDir)
	if err != nil {
		return err
	}
	defer unlock()
	opts := []cni.Opt{cni.WithPluginDir([]string{cniPath})}
	for _, name := range networks {
		b, err := conflist(confDir, name)
		if err != nil {
			return err
		}
		opts = append(opts, cni.WithConfListBytes(b))
	}
	c, err := cni.New(opts...)
	if err != nil {
		return fmt.Errorf("load CNI networks %v: %w", networks, err)
	}
	var nsOpts []cni.NamespaceOpts
	if len(ports) > 0 {
		nsOpts = append(nsOpts, cni.WithCapabilityPortMap(ports))
	}
	ctx := context.Background()
	record := filepath.Join(dataRoot, fullID+".json")

	switch event {
	case "createRuntime":
		nsPath := fmt.Sprintf("/proc/%d/ns/net", state.Pid)
		if state.Pid == 0 {
			return errors.New("the state has no pid")
		}
		if _, err := os.Stat(nsPath); err != nil {
			return fmt.Errorf("the container's network namespace: %w", err)
		}
		_ = c.Remove(ctx, fullID, "", nsOpts...) // as nerdctl: a previous run's leftovers
		res, err := c.Setup(ctx, fullID, nsPath, nsOpts...)
		if err != nil {
			return fmt.Errorf("cni setup: %w", err)
		}
		var addrs []string
		for _, cfg := range res.Interfaces[ifName].IPConfigs {
			addrs = append(addrs, (&net.IPNet{IP: cfg.IP, Mask: net.CIDRMask(len(cfg.IP)*8, len(cfg.IP)*8)}).String())
		}
		b, _ := json.Marshal(recorded{Networks: networks, Addresses: addrs})
		if err := os.MkdirAll(dataRoot, 0o700); err != nil {
			return err
		}
		return os.WriteFile(record, b, 0o600)
	case "postStop":
		if err := c.Remove(ctx, fullID, "", nsOpts...); err != nil {
			return fmt.Errorf("cni remove: %w", err)
		}
		b, err := os.ReadFile(record)
		if errors.Is(err, os.ErrNotExist) {
			return nil // createRuntime did not get that far
		} else if err != nil {
			return err
		}
		var r recorded
		if err := json.Unmarshal(b, &r); err != nil {
			return fmt.Errorf("%s: %w", record, err)
		}
		for _, name := range r.Networks {
			if err := teardownIPMasq(name, fullID, r.Addresses); err != nil {
				return fmt.Errorf("remove the bridge's ipMasq rules: %w", err)
			}
		}
		return os.Remove(record)
	}
	return fmt.Errorf("unexpected event %q", event)
}

// recorded is what createRuntime leaves for postStop.
type recorded struct {
	Networks  []string
	Addresses []string // the container's, each as a host prefix (/32, /128)
}

// conflist returns the conflist in dir whose "name" is name.
func conflist(dir, name string) ([]byte, error) {
	files, err := filepath.Glob(filepath.Join(dir, "*.conflist"))
	if err != nil {
		return nil, err
	}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			return nil, err
		}
		var c struct{ Name string }
		if json.Unmarshal(b, &c) == nil && c.Name == name {
			return b, nil
		}
	}
	return nil, fmt.Errorf("no CNI network %q in %s", name, dir)
}

// lock takes nerdctl's lock: CNI plugins are not safe to run concurrently (nerdctl#3518).
func lock(dir string) (func(), error) {
	f, err := os.Open(dir)
	if err != nil {
		return nil, err
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX); err != nil {
		f.Close()
		return nil, fmt.Errorf("lock %s: %w", dir, err)
	}
	return func() { unix.Flock(int(f.Fd()), unix.LOCK_UN); f.Close() }, nil
}

// teardownIPMasq removes the bridge plugin's ipMasq rules for a container of network name:
// the POSTROUTING jump from each of its addresses to the container's chain, and the chain
// (the names and comment of containernetworking/plugins' pkg/ip and pkg/utils, v1.9.1).
func teardownIPMasq(name, id string, addrs []string) error {
	chain := fmt.Sprintf("CNI-%x", sha512.Sum512([]byte(name+id)))[:28]
	comment := fmt.Sprintf("name: %q id: %q", name, id)
	var errs []error
	for _, a := range addrs {
		addr, _, err := net.ParseCIDR(a)
		if err != nil {
			continue
		}
		cmd := "iptables"
		if addr.To4() == nil {
			cmd = "ip6tables"
		}
		if err := iptables(cmd, "-t", "nat", "-D", "POSTROUTING", "-s", addr.String(), "-j", chain, "-m", "comment", "--comment", comment); err != nil {
			errs = append(errs, err)
		}
		for _, op := range []string{"-F", "-X"} {
			if err := iptables(cmd, "-t", "nat", op, chain); err != nil {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}

// iptables runs an iptables command; a rule or chain that is not there is no error (DEL
// may run twice).
func iptables(cmd string, args ...string) error {
	out, err := exec.Command(cmd, append([]string{"-w"}, args...)...).CombinedOutput()
	if err != nil && !strings.Contains(string(out), "does not exist") && !strings.Contains(string(out), "No chain/target/match") && !strings.Contains(string(out), "Bad rule") {
		return fmt.Errorf("%s %s: %v: %s", cmd, strings.Join(args, " "), err, out)
	}
	return nil
}

// Command fakeqemu stands in for qemu-system-x86_64 in the hostile-guest tests: the shim
// starts it with the command line it gives QEMU; it serves enough of QMP on the monitor
// socket for the shim to start, change and stop a VM, and runs a hostile agent
// (../hostileagent) on the agent channel's socket, where a guest's agent would answer.
//
// The behaviour is the pod's: the state directory of a pod ends with its id (see
// shim/podid.StateDir), and a test names its container after the behaviour. The ids
// WrongIDs names come from the kernel command line (guest.kernel_params), as
// hostile.others=ID,ID. Nothing else is read from the host: the shim may run this
// binary in its jail, which holds only the binary and the VM's files.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/caisson-containers/caisson/integration-tests/hostile/hostileagent"
)

// OthersParam is the kernel parameter naming the ids WrongIDs reports.
const OthersParam = "hostile.others"

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "fakeqemu:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	var qmpPath, agentPath string
	var others []string
	for i := 0; i < len(args); i++ {
		switch args[i] {
		case "-version", "--version":
			fmt.Println("QEMU emulator version 7.2.0 (fakeqemu)")
			return nil
		case "-append":
			if i+1 < len(args) {
				for _, f := range strings.Fields(args[i+1]) {
					if v, ok := strings.CutPrefix(f, OthersParam+"="); ok {
						others = strings.Split(v, ",")
					}
				}
			}
		case "-chardev":
			if i+1 >= len(args) {
				return fmt.Errorf("-chardev without a value")
			}
			i++
			opts := chardevOptions(args[i])
			switch opts["id"] {
			case "qmp":
				qmpPath = opts["path"]
			case "agent":
				agentPath = opts["path"]
			}
		}
	}
	if qmpPath == "" || agentPath == "" {
		return fmt.Errorf("no qmp or agent chardev socket in %q", args)
	}
	b, err := behaviour(agentPath)
	if err != nil {
		return err
	}
	fmt.Fprintf(os.Stderr, "fakeqemu: behaviour %s\n", b)

	qmpL, err := net.Listen("unix", qmpPath)
	if err != nil {
		return err
	}
	agentL, err := net.Listen("unix", agentPath)
	if err != nil {
		return err
	}
	go serveQMP(qmpL)
	a := hostileagent.New(b, others)
	for {
		c, err := agentL.Accept()
		if err != nil {
			return err
		}
		// One host connection at a time, as a virtio-serial port has.
		if err := a.Serve(context.Background(), c); err != nil {
			fmt.Fprintln(os.Stderr, "fakeqemu: agent:", err)
		}
		c.Close()
	}
}

// chardevOptions parses "socket,id=qmp,server=on,path=P" (",," is a comma in a value).
func chardevOptions(v string) map[string]string {
	const comma = "\x00"
	opts := map[string]string{}
	for _, kv := range strings.Split(strings.ReplaceAll(v, ",,", comma), ",") {
		k, val, _ := strings.Cut(kv, "=")
		opts[k] = strings.ReplaceAll(val, comma, ",")
	}
	return opts
}

// behaviour is the one the pod's state directory (two levels above the agent socket,
// STATEDIR/vm/agent.sock) names at its end.
func behaviour(agentPath string) (hostileagent.Behaviour, error) {
	pod := filepath.Base(filepath.Dir(filepath.Dir(agentPath)))
	for _, b := range hostileagent.Behaviours {
		if strings.HasSuffix(pod, "-"+string(b)) {
			return b, nil
		}
	}
	return "", fmt.Errorf("pod %s names no behaviour", pod)
}

// serveQMP answers QMP on every connection to l.
func serveQMP(l net.Listener) {
	for {
		c, err := l.Accept()
		if err != nil {
			return
		}
		go qmpConn(c)
	}
}

type qmpCommand struct {
	Execute   string          `json:"execute"`
	Arguments json.RawMessage `json:"arguments"`
	ID        json.RawMessage `json:"id"`
}

func qmpConn(c net.Conn) {
	defer c.Close()
	var mu sync.Mutex
	send := func(v any) {
		b, _ := json.Marshal(v)
		mu.Lock()
		defer mu.Unlock()
		c.Write(append(b, '\n'))
	}
	event := func(name string, data any) {
		now := time.Now()
		send(map[string]any{"event": name, "data": data,
			"timestamp": map[string]int64{"seconds": now.Unix(), "microseconds": int64(now.Nanosecond() / 1000)}})
	}
	send(map[string]any{"QMP": map[string]any{
		"version":      map[string]any{"qemu": map[string]int{"major": 7, "minor": 2, "micro": 0}, "package": "fakeqemu"},
		"capabilities": []string{},
	}})
	sc := bufio.NewScanner(c)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		var cmd qmpCommand
		if err := json.Unmarshal(sc.Bytes(), &cmd); err != nil {
			continue
		}
		ret := any(map[string]any{})
		switch cmd.Execute {
		case "query-status":
			ret = map[string]any{"status": "running", "running": true, "singlestep": false}
		}
		reply := map[string]any{"return": ret}
		if cmd.ID != nil {
			reply["id"] = cmd.ID
		}
		send(reply)
		switch cmd.Execute {
		case "quit":
			event("SHUTDOWN", map[string]any{"guest": false, "reason": "host-qmp-quit"})
			os.Exit(0)
		case "device_del":
			var a struct {
				ID string `json:"id"`
			}
			json.Unmarshal(cmd.Arguments, &a)
			event("DEVICE_DELETED", map[string]any{"device": a.ID, "path": "/machine/peripheral/" + a.ID})
		}
	}
}

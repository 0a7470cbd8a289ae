package virtiofs

// Pid is virtiofsd's pid: the pod puts it in the VM's cgroup before QEMU connects,
// so that the sandboxed child it forks then is born there too (shim/pod).
func (d *Daemon) Pid() int { return d.cmd.Process.Pid }

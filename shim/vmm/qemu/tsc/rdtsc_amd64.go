package tsc

const supported = true

// rdtsc is the RDTSC instruction: the TSC of the CPU the thread runs on.
func rdtsc() uint64

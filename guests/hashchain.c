/*
 * Hash-chain guest: each CPU extends its own chain h[n] = mix(h[n-1], n) and prints
 * "H<cpu> <n> <h>" per step. A host-side test recomputes the chains, so any lost or
 * repeated step across a pause, snapshot or migration shows up.
 *
 * cmdline: cpus=N (default 1)  rounds=R mixing rounds per step (default 256)
 *          steps=N stop after N steps (default 0 = forever)  int3 (exercise CPL0 int3 first)
 */
#include "rt.h"

static uint64_t rounds, steps;

static uint64_t mix(uint64_t h, uint64_t n)
{
	for (uint64_t r = 0; r < rounds; r++) {
		h ^= h >> 31;
		h *= 0x9e3779b97f4a7c15ULL;
		h += n;
	}
	return h;
}

static void chain(int cpu)
{
	uint64_t h = 0x6a09e667f3bcc908ULL ^ (uint64_t)cpu;
	for (uint64_t n = 1; !steps || n <= steps; n++) {
		h = mix(h, n);
		lock_console();
		putc_('H');
		putu((uint64_t)cpu);
		putc_(' ');
		putu(n);
		putc_(' ');
		puthex(h, 16);
		putc_('\n');
		unlock_console();
	}
}

static volatile int done;

static void ap_main(int cpu)
{
	chain(cpu);
	__atomic_add_fetch(&done, 1, __ATOMIC_SEQ_CST);
}

void main(const char *cmdline)
{
	int cpus = (int)arg_u64(cmdline, "cpus", 1);
	rounds = arg_u64(cmdline, "rounds", 256);
	steps = arg_u64(cmdline, "steps", 0);
	if (arg_flag(cmdline, "int3"))
		kit_syscall(1);
	int up = smp_boot(cpus, ap_main);
	lock_console();
	puts_("hashchain cpus=");
	putu((uint64_t)up);
	putc_('\n');
	unlock_console();
	chain(0);
	while (done < up - 1)
		cpu_relax();
	puts_("hashchain done\n");
}

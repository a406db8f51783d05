/*
 * CPUID guest: prints what user mode (U) and kernel mode (K, through a kit syscall) see
 * for leaf 1 (ECX, EDX) and leaf 7.0 (EBX, ECX), one line each, then powers off:
 *   U1 <ecx> <edx>   U7 <ebx> <ecx>   K1 <ecx> <edx>   K7 <ebx> <ecx>   (hex)
 * A host test checks the VMM's hidden features against it (README: --cpuid-clear).
 */
#include "rt.h"

static void cpuid(uint32_t leaf, uint32_t *a, uint32_t *b, uint32_t *c, uint32_t *d)
{
	__asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(0));
}

static void line(const char *tag, uint32_t x, uint32_t y)
{
	puts_(tag);
	puthex(x, 8);
	putc_(' ');
	puthex(y, 8);
	putc_('\n');
}

void main(const char *cmdline)
{
	(void)cmdline;
	uint32_t a, b, c, d;
	cpuid(1, &a, &b, &c, &d);
	line("U1 ", c, d);
	cpuid(7, &a, &b, &c, &d);
	line("U7 ", b, c);
	uint64_t k = (uint64_t)kit_syscall(2);
	line("K1 ", (uint32_t)k, (uint32_t)(k >> 32));
	k = (uint64_t)kit_syscall(3);
	line("K7 ", (uint32_t)k, (uint32_t)(k >> 32));
	puts_("CPUID done\n");
	poweroff();
}

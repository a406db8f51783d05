/*
 * Echo guest: reads COM1 (polling its line status register from user mode) and prints
 * each byte it receives as "<hex>", one line per newline; 'q' powers it off. A host test
 * checks that the console's input reaches the guest (README: stdin to the guest).
 */
#include "rt.h"

#define COM1 0x3f8

void main(const char *cmdline)
{
	(void)cmdline;
	puts_("echo ready\n");
	for (;;) {
		while (!(inb(COM1 + 5) & 0x01))
			delay_us(200);
		uint8_t c = inb(COM1);
		putc_('<');
		puthex(c, 2);
		putc_('>');
		if (c == '\n')
			putc_('\n');
		if (c == 'q') {
			puts_("\nbye\n");
			poweroff();
		}
	}
}

/*
 * pyhyve guest kit: PVH entry, long mode, and the drop to ring 3.
 *
 * The CPL0 part is kept to a few hundred instructions because on our hosts kernel-mode
 * guest code is emulated (~1 us per instruction). Page tables are built by the assembler,
 * not at run time. Ring-3 code runs on user-accessible identity-mapped pages with every
 * port opened by the TSS I/O bitmap, so it does port I/O and touches the LAPIC itself.
 * (IOPL=3 is not used: kvm_pvm drops IOPL from RFLAGS at the first exit.)
 */
#define MAX_CPUS 8
#define KSTACK 4096
#define USTACK 65536
#define COM1 0x3f8
#define IRQ_VECTOR 0x40		/* rt.h: KIT_IRQ_VECTOR */
#define TSS_SIZE (104 + 8192 + 8)	/* TSS, I/O bitmap (all ports open), 0xFF end byte */

/* ---- PVH note: XEN_ELFNOTE_PHYS32_ENTRY (18) ------------------------------------- */
	.section .note.Xen, "a"
	.p2align 2
	.long 4, 8, 18
	.asciz "Xen"
	.p2align 2
	.quad _start32

/* ---- AP trampoline, at 0x8000 (SIPI vector 0x08), real mode ---------------------- */
	.section .tramp, "ax"
	.code16
	.globl ap_tramp
ap_tramp:
	cli
	xorw %ax, %ax
	movw %ax, %ds
	lgdtl tramp_gdt_desc
	movl %cr0, %eax
	orl $1, %eax
	movl %eax, %cr0
	ljmpl $0x28, $ap_start32
	.p2align 3
tramp_gdt_desc:
	.word gdt_end - gdt - 1
	.long gdt

/* ---- 32-bit entry (PVH: paging off, flat segments, EBX = hvm_start_info) --------- */
	.section .text.entry, "ax"
	.code32
.macro ENTER_LONG_MODE target
	movl $pml4, %eax
	movl %eax, %cr3
	movl %cr4, %eax
	orl $0x20, %eax			/* PAE */
	movl %eax, %cr4
	movl $0xC0000080, %ecx
	rdmsr
	orl $0x101, %eax		/* EFER.LME | EFER.SCE */
	wrmsr
	movl %cr0, %eax
	orl $0x80000001, %eax		/* PG | PE */
	movl %eax, %cr0
	lgdt gdt_desc
	ljmp $0x08, $\target
.endm

	.globl _start32
_start32:
	cli
	movl %ebx, %edi			/* start_info, kept for ring 3 */
	ENTER_LONG_MODE bsp64

ap_start32:
	movw $0x10, %ax
	movw %ax, %ds
	movw %ax, %es
	movw %ax, %ss
	ENTER_LONG_MODE ap64

	.code64
.macro LOAD_SEGS
	movw $0x10, %ax
	movw %ax, %ds
	movw %ax, %es
	movw %ax, %ss
	xorw %ax, %ax
	movw %ax, %fs
	movw %ax, %gs
.endm

bsp64:
	LOAD_SEGS
	movq $kstack + KSTACK, %rsp
	call setup_tables
	xorl %ecx, %ecx			/* cpu 0 */
	movq $rt_start, %rdx		/* ring-3 entry, rdi = start_info */
	jmp enter_user

ap64:
	LOAD_SEGS
	movl $1, %eax
	lock xaddl %eax, cpu_count	/* eax = this AP's index */
	movl %eax, %ecx
	leaq 1(%rcx), %rsp
	shlq $12, %rsp
	addq $kstack, %rsp
	movq %rcx, %rdi			/* ring-3 arg: cpu index */
	movq $rt_ap_start, %rdx
	jmp enter_user

/* rcx = cpu index, rdx = ring-3 entry, rdi/rsi = its arguments */
enter_user:
	movl %ecx, %eax
	shll $4, %eax
	addl $0x30, %eax
	ltr %ax
	lidt idt_desc
	pushq %rcx
	pushq %rdx
	movl $0xC0000081, %ecx		/* STAR: kernel CS 0x08, user base 0x10 (SS 0x1b, CS 0x23) */
	xorl %eax, %eax
	movl $0x00100008, %edx
	wrmsr
	movl $0xC0000082, %ecx		/* LSTAR */
	movl $syscall_entry, %eax
	xorl %edx, %edx
	wrmsr
	movl $0xC0000084, %ecx		/* FMASK: IF off on entry */
	movl $0x200, %eax
	wrmsr
	popq %rdx
	popq %rcx
	movq %rcx, %rsi
	leaq 1(%rcx), %rax
	shlq $16, %rax
	addq $ustack, %rax
	pushq $0x1b			/* ss: user data, RPL 3 */
	pushq %rax			/* rsp */
	pushq $0x0002			/* rflags: IF=0; ports are opened by the TSS bitmap */
	pushq $0x23			/* cs: user code, RPL 3 */
	pushq %rdx			/* rip */
	iretq

/* TSS + descriptor per CPU, IDT entries for the exceptions and #BP. */
setup_tables:
	xorl %ecx, %ecx
1:	imulq $TSS_SIZE, %rcx, %rax
	addq $tss, %rax
	leaq 1(%rcx), %rdx
	shlq $12, %rdx
	addq $kstack, %rdx
	movq %rdx, 4(%rax)		/* rsp0 */
	movw $104, 102(%rax)		/* I/O bitmap right after the TSS */
	movb $0xFF, 104 + 8192(%rax)
	movq %rcx, %rdx
	shlq $4, %rdx
	addq $gdt + 0x30, %rdx
	movw $104 + 8192, (%rdx)
	movw %ax, 2(%rdx)
	movq %rax, %rbx
	shrq $16, %rbx
	movb %bl, 4(%rdx)
	movb $0x89, 5(%rdx)		/* present, 64-bit available TSS */
	movb $0, 6(%rdx)
	shrq $8, %rbx
	movb %bl, 7(%rdx)
	shrq $8, %rbx
	movl %ebx, 8(%rdx)
	movl $0, 12(%rdx)
	incq %rcx
	cmpq $MAX_CPUS, %rcx
	jb 1b

	xorl %ecx, %ecx
2:	movq %rcx, %rax
	shlq $4, %rax
	addq $exc_stubs, %rax
	movb $0x8E, %bl
	call set_gate
	incq %rcx
	cmpq $32, %rcx
	jb 2b
	movl $3, %ecx
	movq $bp_handler, %rax
	movb $0xEE, %bl			/* DPL 3: int3 from ring 3 too */
	call set_gate
	movl $6, %ecx
	movq $ud_handler, %rax
	movb $0x8E, %bl
	call set_gate
	movl $IRQ_VECTOR, %ecx
	movq $irq_handler, %rax
	movb $0x8E, %bl
	call set_gate
	movl $0xFF, %ecx		/* the LAPIC's spurious vector: no EOI */
	movq $spurious_handler, %rax
	movb $0x8E, %bl
	call set_gate
	ret

/* rcx = vector, rax = handler, bl = type/attributes */
set_gate:
	movq %rcx, %rdx
	shlq $4, %rdx
	addq $idt, %rdx
	movw %ax, (%rdx)
	movw $0x08, 2(%rdx)
	movb $0, 4(%rdx)
	movb %bl, 5(%rdx)
	shrq $16, %rax
	movw %ax, 6(%rdx)
	shrq $16, %rax
	movl %eax, 8(%rdx)
	movl $0, 12(%rdx)
	ret

/* CPL0 console output without LSR polling: kept short on purpose. rsi = string */
kputs:
	movw $COM1, %dx
1:	lodsb
	testb %al, %al
	jz 2f
	outb %al, %dx
	jmp 1b
2:	ret

/* rax = value, printed as 16 hex digits */
kputhex:
	movl $16, %ecx
	movw $COM1, %dx
1:	rolq $4, %rax
	movq %rax, %rbx
	andl $15, %ebx
	movb hexdigits(%rbx), %bl
	xchgq %rax, %rbx
	outb %al, %dx
	xchgq %rax, %rbx
	decl %ecx
	jnz 1b
	ret

	.p2align 4
exc_stubs:
	.set vec, 0
	.rept 32
	.p2align 4
	.if (vec == 8) || ((vec >= 10) && (vec <= 14)) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
	pushq $vec
	.else
	pushq $0
	pushq $vec
	.endif
	jmp exc_common
	.set vec, vec + 1
	.endr

/* Fatal exception: print vector, error code and RIP, then ask for a reset. */
exc_common:
	movq $msg_exc, %rsi
	call kputs
	movq (%rsp), %rax
	call kputhex
	movq $msg_err, %rsi
	call kputs
	movq 8(%rsp), %rax
	call kputhex
	movq $msg_rip, %rsi
	call kputs
	movq 16(%rsp), %rax
	call kputhex
	movq $msg_cs, %rsi
	call kputs
	movq 24(%rsp), %rax
	call kputhex
	movq $msg_fl, %rsi
	call kputs
	movq 32(%rsp), %rax
	call kputhex
	movq $msg_nl, %rsi
	call kputs
	movb $0xFE, %al
	outb %al, $0x64			/* i8042 reset line: the VMM stops the guest */
3:	cli
	hlt
	jmp 3b

bp_handler:
	pushq %rax
	pushq %rbx
	pushq %rcx
	pushq %rdx
	pushq %rsi
	movq $msg_bp, %rsi
	call kputs
	popq %rsi
	popq %rdx
	popq %rcx
	popq %rbx
	popq %rax
	iretq

/*
 * kit_wait_irq(): ring 3 sleeps until an interrupt was taken. Ring 3 runs with interrupts
 * off, and on kvm_pvm neither an interrupt nor a `syscall` enters kernel mode from there
 * (docs/linux.md, patch 0001), but an exception does: the ud2 below raises #UD, whose
 * handler sees it came from here and waits in kernel mode (sti; hlt, as an idle loop does),
 * then returns past it. Any other #UD is fatal, as before.
 */
	.text
	.globl kit_wait_irq
kit_wait_irq:
wait_irq_ud2:
	ud2
	ret
	.section .text.entry, "ax"

ud_handler:
	cmpq $wait_irq_ud2, (%rsp)	/* the saved rip */
	jne 1f
	addq $2, (%rsp)
	sti				/* its shadow keeps the interrupt out until hlt sleeps */
	hlt
	cli
	iretq
1:	pushq $0
	pushq $6
	jmp exc_common

/* A device's interrupt (a virtio MSI-X vector the guest pointed here): count it and end
 * it at the xAPIC. Ring-3 code waits for the count to change; a handful of instructions,
 * because each one is emulated at CPL0 on the project's hosts. */
irq_handler:
	incq irq_count
	pushq %rax
	movl $0xFEE000B0, %eax		/* EOI */
	movl $0, (%rax)
	popq %rax
spurious_handler:
	iretq

/*
 * `syscall` from ring 3 (software interrupts from ring 3 raise #UD on kvm_pvm, syscall
 * works everywhere). rax = 1: execute int3 at CPL0, which exercises the VMM's #BP path.
 * rax = 2 / 3: CPUID leaf 1 / leaf 7.0 as kernel mode sees it, returned as
 * ecx | edx << 32 (leaf 1) or ebx | ecx << 32 (leaf 7).
 * Runs on the caller's stack (the kit's ring-3 code is single-threaded per CPU) and returns
 * with iretq, because the host's emulator has no sysret.
 */
syscall_entry:
	movq %rsp, %r10
	cmpq $1, %rax
	jne 3f
	int3
	xorl %eax, %eax
	jmp 2f
3:	cmpq $2, %rax
	jne 4f
	pushq %rcx			/* the return rip; cpuid clobbers rcx and rbx */
	pushq %rbx
	movl $1, %eax
	xorl %ecx, %ecx
	cpuid
	movl %ecx, %eax
	shlq $32, %rdx
	orq %rdx, %rax
	popq %rbx
	popq %rcx
	jmp 2f
4:	cmpq $3, %rax
	jne 1f
	pushq %rcx
	pushq %rbx
	movl $7, %eax
	xorl %ecx, %ecx
	cpuid
	movl %ebx, %eax
	shlq $32, %rcx
	orq %rcx, %rax
	popq %rbx
	popq %rcx
	jmp 2f
1:	movq $-1, %rax
2:	pushq $0x1b
	pushq %r10
	pushq %r11
	pushq $0x23
	pushq %rcx
	iretq

	.section .rodata
hexdigits: .ascii "0123456789abcdef"
msg_exc: .asciz "\r\n!EXC vector="
msg_err: .asciz " error="
msg_rip: .asciz " rip="
msg_nl: .asciz "\r\n"
msg_cs: .asciz " cs="
msg_fl: .asciz " rflags="
msg_bp: .asciz "[kit] int3 at cpl0 handled\r\n"

/* ---- tables -------------------------------------------------------------------- */
	.section .data
	.p2align 12
pml4:
	.quad pdpt + 7
	.fill 511, 8, 0
pdpt:
	.quad pd + 7
	.quad pd + 0x1000 + 7
	.quad pd + 0x2000 + 7
	.quad pd + 0x3000 + 7
	.fill 508, 8, 0
pd:					/* 0..4 GiB in 2 MiB pages: present, rw, user, large */
	.set i, 0
	.rept 2048
	.quad (i << 21) + 0x87
	.set i, i + 1
	.endr

	.p2align 4
gdt:
	.quad 0				/* 0x00 */
	.quad 0x00209A0000000000	/* 0x08 kernel code, 64-bit */
	.quad 0x00CF92000000FFFF	/* 0x10 kernel data */
	.quad 0x00CFF2000000FFFF	/* 0x18 user data (0x1b) */
	.quad 0x0020FA0000000000	/* 0x20 user code, 64-bit (0x23) */
	.quad 0x00CF9A000000FFFF	/* 0x28 kernel code, 32-bit (AP start) */
	.fill MAX_CPUS * 2, 8, 0	/* 0x30 TSS descriptors, 16 bytes each */
gdt_end:
	.p2align 4
gdt_desc:
	.word gdt_end - gdt - 1
	.quad gdt
	.p2align 4
idt_desc:
	.word 256 * 16 - 1
	.quad idt
	.globl cpu_count
	.p2align 2
cpu_count:
	.long 1
	.globl irq_count
	.p2align 3
irq_count:
	.quad 0

	.section .bss
	.p2align 12
idt:	.skip 256 * 16
	.p2align 4
tss:	.skip TSS_SIZE * MAX_CPUS
	.p2align 12
kstack:	.skip KSTACK * MAX_CPUS
	.p2align 12
ustack:	.skip USTACK * MAX_CPUS

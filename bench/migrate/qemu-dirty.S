/*
 * The QEMU side of the migration benchmark: a multiboot (32-bit, flat, no
 * paging) guest that does what labvm's `dirty` workload does: increment a
 * counter in memory forever and, paced by the TSC, write the counter into
 * RATE pages per second cycling over a region of PAGES pages.
 * Assemble with --defsym CYC=<TSC cycles between page writes>,
 * --defsym PAGES=<region pages>.
 */
        .set    MB_MAGIC, 0x1BADB002
        .set    MB_FLAGS, 0
        .set    COUNTER, 0x200000
        .set    REGION, 0x201000

        .text
        .code32
        /* Multiboot header: first in .text, so inside the file's first 8 KiB. */
        .align  4
        .long   MB_MAGIC, MB_FLAGS, -(MB_MAGIC + MB_FLAGS)

        .globl  _start
_start:
        cli
        rdtsc
        mov     %eax, deadline_lo
        mov     %edx, deadline_hi
        xor     %ebx, %ebx                      /* next page index */
1:      incl    COUNTER
        jnz     2f
        incl    COUNTER + 4
2:      rdtsc
        cmp     deadline_hi, %edx
        jb      1b
        ja      3f
        cmp     deadline_lo, %eax
        jae     3f
        jmp     1b
3:      /* due: write the counter into the next page, advance the deadline */
        mov     %ebx, %ecx
        shl     $12, %ecx
        mov     COUNTER, %eax
        mov     %eax, REGION(%ecx)
        inc     %ebx
        cmp     $PAGES, %ebx
        jb      4f
        xor     %ebx, %ebx
4:      addl    $CYC, deadline_lo
        adcl    $0, deadline_hi
        jmp     2b

        .data
deadline_lo:    .long 0
deadline_hi:    .long 0

/*
 * The lab guest: a small x86-64 program that labvm runs at CPL3 in 64-bit
 * long mode with identity-mapped user pages. Only CPL3 code runs natively on
 * PVM hosts, so the workload never leaves ring 3; it talks to the host by
 * writing to the lab device, a guest-physical page with no memory behind it
 * (every access is an MMIO exit). The exception stubs at the end run at CPL0
 * (emulated on PVM): they only report the fault to the host.
 *
 * Layout and register offsets must match vmm/src/guest.rs (a unit test
 * checks the header that this file starts with).
 *
 * Entry: rdi = vCPU index, rsp = this vCPU's user stack (set by labvm).
 */
        .intel_syntax noprefix
        .code64

        .equ PARAMS,          0x6000
        .equ P_MAGIC,         0x00
        .equ P_WORKLOAD,      0x08
        .equ P_NR_VCPUS,      0x10
        .equ P_TSC_KHZ,       0x18
        .equ P_STAMP,         0x20
        .equ P_DONE,          0x28
        .equ P_COUNTER_ADDR,  0x30
        .equ P_DIRTY_BASE,    0x38
        .equ P_DIRTY_PAGES,   0x40
        .equ P_DIRTY_RATE,    0x48
        .equ P_HEARTBEAT_MS,  0x50
        .equ P_LISTS,         0x100   /* per vCPU: (list gpa, entry count) */
        .equ B_STACK_TOP,     0x440   /* balloon workload: the driver's stack */
        .equ DRIVER_BASE,     0x180000 /* balloon_driver.rs, loaded by labvm */

        .equ LABDEV,          0xF00000000
        .equ R_READY,         0x00
        .equ R_PROGRESS,      0x08
        .equ R_EXIT,          0x10
        .equ R_LOG,           0x18
        .equ R_PARK,          0x20
        .equ R_HEARTBEAT,     0x28
        .equ R_FAULT,         0x30

        .equ W_TOUCH,         1
        .equ W_DIRTY,         2
        .equ W_FAULT_UD,      3
        .equ W_FAULT_PF,      4
        .equ W_NEVER_READY,   5
        .equ W_BALLOON,       6

        .equ PROGRESS_EVERY,  16384   /* pages between progress reports */

        .section .text
        .globl _start
/* Header read by labvm: magic, entry point, address of the ISR table. */
header:
        .quad 0x314753454c42414c     /* "LABLEG1" little-endian + '1' */
        .quad _start
        .quad isr_table

_start:
        mov     r15, rdi                       /* vCPU index */
        mov     r14, PARAMS
        mov     r13, LABDEV
        test    r15, r15
        jnz     1f
        lea     rax, [rip + hello]
        mov     [r13 + R_LOG], rax
1:
        mov     rax, [r14 + P_WORKLOAD]
        cmp     rax, W_TOUCH
        je      touch
        cmp     rax, W_DIRTY
        je      dirty
        cmp     rax, W_FAULT_UD
        je      fault_ud
        cmp     rax, W_FAULT_PF
        je      fault_pf
        cmp     rax, W_NEVER_READY
        je      never_ready
        cmp     rax, W_BALLOON
        je      balloon
        mov     qword ptr [r13 + R_EXIT], 0xbad   /* unknown workload */
        jmp     park

/*
 * Touch workload. This vCPU's list is an array of 24-byte entries
 * (gpa, pages, spin_cycles): write one stamped qword to each 4 KiB page of
 * the run, then spin for spin_cycles TSC cycles.
 */
touch:
        mov     rax, r15
        shl     rax, 4
        mov     rbx, [r14 + P_LISTS + rax]      /* list gpa */
        mov     rcx, [r14 + P_LISTS + rax + 8]  /* entries */
        mov     r12, [r14 + P_STAMP]
        xor     r11, r11                        /* pages touched */
.Lentry:
        test    rcx, rcx
        jz      .Ldone
        mov     rsi, [rbx]                      /* gpa */
        mov     rdx, [rbx + 8]                  /* pages */
        mov     r8,  [rbx + 16]                 /* spin cycles */
.Lpage:
        test    rdx, rdx
        jz      .Lspin
        mov     rax, rsi
        xor     rax, r12
        mov     [rsi], rax
        add     rsi, 4096
        dec     rdx
        inc     r11
        test    r11, PROGRESS_EVERY - 1
        jnz     .Lpage
        mov     [r13 + R_PROGRESS], r11
        jmp     .Lpage
.Lspin:
        test    r8, r8
        jz      .Lnext
        rdtsc
        shl     rdx, 32
        or      rax, rdx
        mov     r9, rax
        add     r9, r8
2:      pause
        rdtsc
        shl     rdx, 32
        or      rax, rdx
        cmp     rax, r9
        jb      2b
.Lnext:
        add     rbx, 24
        dec     rcx
        jmp     .Lentry
.Ldone:
        mov     [r13 + R_PROGRESS], r11
        lock inc qword ptr [r14 + P_DONE]
        test    r15, r15
        jnz     park
        mov     rcx, [r14 + P_NR_VCPUS]
3:      cmp     [r14 + P_DONE], rcx
        jae     4f
        pause
        jmp     3b
4:      mov     qword ptr [r13 + R_READY], 1
        mov     qword ptr [r13 + R_EXIT], 0
        jmp     park

/*
 * Long-running workload: vCPU 0 signals ready, then forever increments a
 * counter kept in guest memory and, paced by the TSC, writes the counter
 * into dirty_rate pages per second, cycling over the dirty region. A
 * heartbeat (the counter) reaches the host every heartbeat_ms.
 */
dirty:
        test    r15, r15
        jnz     park
        mov     qword ptr [r13 + R_READY], 1
        mov     r12, [r14 + P_COUNTER_ADDR]
        mov     rbx, [r14 + P_DIRTY_BASE]
        mov     r10, [r14 + P_DIRTY_PAGES]
        xor     r9, r9                          /* next page index */
        xor     r11, r11                        /* pages dirtied so far */
        rdtsc
        shl     rdx, 32
        or      rax, rdx
        mov     rdi, rax                        /* t0 */
        mov     rsi, rax                        /* last heartbeat */
.Lloop:
        inc     qword ptr [r12]
        rdtsc
        shl     rdx, 32
        or      rax, rdx
        mov     r8, rax                         /* now */
        /* due = (now - t0) * rate / (tsc_khz * 1000) */
        mov     rax, r8
        sub     rax, rdi
        mul     qword ptr [r14 + P_DIRTY_RATE]
        mov     rcx, [r14 + P_TSC_KHZ]
        imul    rcx, rcx, 1000
        div     rcx
        cmp     r10, 0
        je      .Lheartbeat
.Ldirty_more:
        cmp     r11, rax
        jae     .Lheartbeat
        mov     rcx, r9
        shl     rcx, 12
        mov     rdx, [r12]
        mov     [rbx + rcx], rdx
        inc     r11
        inc     r9
        cmp     r9, r10
        jb      .Ldirty_more
        xor     r9, r9
        jmp     .Ldirty_more
.Lheartbeat:
        /* heartbeat when now - last >= heartbeat_ms * tsc_khz */
        mov     rax, [r14 + P_HEARTBEAT_MS]
        test    rax, rax
        jz      .Lloop
        imul    rax, [r14 + P_TSC_KHZ]
        mov     rcx, r8
        sub     rcx, rsi
        cmp     rcx, rax
        jb      .Lloop
        mov     rsi, r8
        mov     rax, [r12]
        mov     [r13 + R_HEARTBEAT], rax
        jmp     .Lloop

fault_ud:
        ud2

fault_pf:
        mov     rax, 0x8000000000               /* 512 GiB: not mapped */
        mov     qword ptr [rax], 1
        mov     qword ptr [r13 + R_EXIT], 0xbad
        jmp     park

never_ready:
        pause
        jmp     never_ready

/*
 * Balloon workload: vCPU 0 runs the virtio-balloon driver (a freestanding
 * Rust program at DRIVER_BASE, see balloon_driver.rs) on its own stack;
 * it returns only when it gives up, with an exit status.
 */
balloon:
        test    r15, r15
        jnz     park
        mov     rsp, [r14 + B_STACK_TOP]
        mov     rdi, r14
        mov     rax, DRIVER_BASE
        call    rax
        mov     [r13 + R_EXIT], rax
        jmp     park

/* Secondary vCPUs (and vCPU 0 after EXIT) park: the host stops running us. */
park:
        mov     qword ptr [r13 + R_PARK], 1
5:      pause
        jmp     5b

hello:
        .asciz  "lab guest: started"

/*
 * Exception stubs (CPL0). Each leaves [vector, error code] on top of the
 * CPU's frame (rip, cs, rflags, rsp, ss) and writes the vector to the
 * fault register; the host reads the frame at the vCPU's rsp and stops the
 * VM. Nothing returns.
 */
        .macro ISR_NOERR n
isr\n:  push    0
        push    \n
        jmp     isr_common
        .endm
        .macro ISR_ERR n
isr\n:  push    \n
        jmp     isr_common
        .endm

        ISR_NOERR 0
        ISR_NOERR 1
        ISR_NOERR 2
        ISR_NOERR 3
        ISR_NOERR 4
        ISR_NOERR 5
        ISR_NOERR 6
        ISR_NOERR 7
        ISR_ERR   8
        ISR_NOERR 9
        ISR_ERR   10
        ISR_ERR   11
        ISR_ERR   12
        ISR_ERR   13
        ISR_ERR   14
        ISR_NOERR 15
        ISR_NOERR 16
        ISR_ERR   17
        ISR_NOERR 18
        ISR_NOERR 19
        ISR_NOERR 20
        ISR_ERR   21
        ISR_NOERR 22
        ISR_NOERR 23
        ISR_NOERR 24
        ISR_NOERR 25
        ISR_NOERR 26
        ISR_NOERR 27
        ISR_NOERR 28
        ISR_ERR   29
        ISR_ERR   30
        ISR_NOERR 31

isr_common:
        mov     rax, LABDEV
        mov     rcx, [rsp]
        mov     [rax + R_FAULT], rcx
6:      jmp     6b

        .balign 8
isr_table:
        .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
        .quad isr\n
        .endr

/*
 * pyvmm: x86 parts of the KVM userspace ABI, as plain C for cffi's cdef.
 * Layouts follow the kernel's uapi (arch/x86/include/uapi/asm/kvm.h); no preprocessor here,
 * so array bounds are written out (KVM_NR_INTERRUPTS = 256 -> 4 u64 words).
 * SPDX-License-Identifier: GPL-2.0-or-later
 */

struct kvm_regs {
    uint64_t rax, rbx, rcx, rdx;
    uint64_t rsi, rdi, rsp, rbp;
    uint64_t r8, r9, r10, r11;
    uint64_t r12, r13, r14, r15;
    uint64_t rip, rflags;
};

struct kvm_segment {
    uint64_t base;
    uint32_t limit;
    uint16_t selector;
    uint8_t  type;
    uint8_t  present, dpl, db, s, l, g, avl;
    uint8_t  unusable;
    uint8_t  padding;
};

struct kvm_dtable {
    uint64_t base;
    uint16_t limit;
    uint16_t padding[3];
};

struct kvm_sregs {
    struct kvm_segment cs, ds, es, fs, gs, ss;
    struct kvm_segment tr, ldt;
    struct kvm_dtable gdt, idt;
    uint64_t cr0, cr2, cr3, cr4, cr8;
    uint64_t efer;
    uint64_t apic_base;
    uint64_t interrupt_bitmap[4];
};

struct kvm_fpu {
    uint8_t  fpr[8][16];
    uint16_t fcw;
    uint16_t fsw;
    uint8_t  ftwx;
    uint8_t  pad1;
    uint16_t last_opcode;
    uint64_t last_ip;
    uint64_t last_dp;
    uint8_t  xmm[16][16];
    uint32_t mxcsr;
    uint32_t pad2;
};

struct kvm_msr_entry {
    uint32_t index;
    uint32_t reserved;
    uint64_t data;
};

/* Variable length: allocate with room for nmsrs entries after the header. */
struct kvm_msrs {
    uint32_t nmsrs;
    uint32_t pad;
    struct kvm_msr_entry entries[];
};

struct kvm_msr_list {
    uint32_t nmsrs;
    uint32_t indices[];
};

struct kvm_cpuid_entry2 {
    uint32_t function;
    uint32_t index;
    uint32_t flags;
    uint32_t eax;
    uint32_t ebx;
    uint32_t ecx;
    uint32_t edx;
    uint32_t padding[3];
};

struct kvm_cpuid2 {
    uint32_t nent;
    uint32_t padding;
    struct kvm_cpuid_entry2 entries[];
};

struct kvm_debug_exit_arch {
    uint32_t exception;
    uint32_t pad;
    uint64_t pc;
    uint64_t dr6;
    uint64_t dr7;
};

struct kvm_vcpu_events {
    struct {
        uint8_t  injected;
        uint8_t  nr;
        uint8_t  has_error_code;
        uint8_t  pending;
        uint32_t error_code;
    } exception;
    struct {
        uint8_t injected;
        uint8_t nr;
        uint8_t soft;
        uint8_t shadow;
    } interrupt;
    struct {
        uint8_t injected;
        uint8_t pending;
        uint8_t masked;
        uint8_t pad;
    } nmi;
    uint32_t sipi_vector;
    uint32_t flags;
    struct {
        uint8_t smm;
        uint8_t pending;
        uint8_t smm_inside_nmi;
        uint8_t latched_init;
    } smi;
    struct {
        uint8_t pending;
    } triple_fault;
    uint8_t  reserved[26];
    uint8_t  exception_has_payload;
    uint64_t exception_payload;
};

struct kvm_sync_regs {
    struct kvm_regs regs;
    struct kvm_sregs sregs;
    struct kvm_vcpu_events events;
};

struct kvm_msr_filter_range {
    uint32_t flags;
    uint32_t nmsrs;
    uint32_t base;
    uint8_t *bitmap;
};

struct kvm_msr_filter {
    uint32_t flags;
    struct kvm_msr_filter_range ranges[16];
};

struct kvm_lapic_state {
    char regs[1024];
};

struct kvm_pit_config {
    uint32_t flags;
    uint32_t pad[15];
};

/* ---- x86 state: save/restore of vCPUs and VMs (pyvmm.state) -------------------------------
 * arch/x86/include/uapi/asm/kvm.h. Bit-fields are left out (the IOAPIC redirection entries are
 * plain u64 words) so that every member has an offset the ABI probe can check. */

/* KVM_GET_XSAVE/SET_XSAVE use exactly this; KVM_GET_XSAVE2 fills KVM_CAP_XSAVE2 bytes. */
struct kvm_xsave {
    uint32_t region[1024];
    uint32_t extra[];
};

struct kvm_xcr {
    uint32_t xcr;
    uint32_t reserved;
    uint64_t value;
};

struct kvm_xcrs {
    uint32_t nr_xcrs;
    uint32_t flags;
    struct kvm_xcr xcrs[16];
    uint64_t padding[16];
};

struct kvm_debugregs {
    uint64_t db[4];
    uint64_t dr6;
    uint64_t dr7;
    uint64_t flags;
    uint64_t reserved[9];
};

struct kvm_vmx_nested_state_hdr {
    uint64_t vmxon_pa;
    uint64_t vmcs12_pa;
    struct {
        uint16_t flags;
    } smm;
    uint16_t pad;
    uint32_t flags;
    uint64_t preemption_timer_deadline;
};

struct kvm_svm_nested_state_hdr {
    uint64_t vmcb_pa;
};

/* Variable length: `size` bytes in all, the vendor's data after the 128-byte header. */
struct kvm_nested_state {
    uint16_t flags;
    uint16_t format;
    uint32_t size;
    union {
        struct kvm_vmx_nested_state_hdr vmx;
        struct kvm_svm_nested_state_hdr svm;
        uint8_t pad[120];
    } hdr;
    uint8_t data[];
};

struct kvm_pic_state {
    uint8_t last_irr;
    uint8_t irr;
    uint8_t imr;
    uint8_t isr;
    uint8_t priority_add;
    uint8_t irq_base;
    uint8_t read_reg_select;
    uint8_t poll;
    uint8_t special_mask;
    uint8_t init_state;
    uint8_t auto_eoi;
    uint8_t rotate_on_auto_eoi;
    uint8_t special_fully_nested_mode;
    uint8_t init4;
    uint8_t elcr;
    uint8_t elcr_mask;
};

struct kvm_ioapic_state {
    uint64_t base_address;
    uint32_t ioregsel;
    uint32_t id;
    uint32_t irr;
    uint32_t pad;
    uint64_t redirtbl[24];
};

struct kvm_irqchip {
    uint32_t chip_id;
    uint32_t pad;
    union {
        char dummy[512];
        struct kvm_pic_state pic;
        struct kvm_ioapic_state ioapic;
    } chip;
};

struct kvm_pit_channel_state {
    uint32_t count;
    uint16_t latched_count;
    uint8_t  count_latched;
    uint8_t  status_latched;
    uint8_t  status;
    uint8_t  read_state;
    uint8_t  write_state;
    uint8_t  write_latch;
    uint8_t  rw_mode;
    uint8_t  mode;
    uint8_t  bcd;
    uint8_t  gate;
    int64_t  count_load_time;
};

struct kvm_pit_state2 {
    struct kvm_pit_channel_state channels[3];
    uint32_t flags;
    uint32_t reserved[9];
};

struct kvm_clock_data {
    uint64_t clock;
    uint32_t flags;
    uint32_t pad0;
    uint64_t realtime;
    uint64_t host_tsc;
    uint32_t pad[4];
};

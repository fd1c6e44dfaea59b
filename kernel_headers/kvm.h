/*
 * pyvmm: the architecture-neutral part of the KVM userspace ABI that pyvmm uses, as plain C
 * for cffi's cdef. Layouts follow include/uapi/linux/kvm.h; x86.h must be declared first.
 * SPDX-License-Identifier: GPL-2.0-or-later
 */

/* The shared page mmapped from a vCPU fd. Only the exit payloads pyvmm decodes are spelled
 * out; `padding` fixes the union at 256 bytes as the kernel does. */
struct kvm_run {
    uint8_t  request_interrupt_window;
    uint8_t  immediate_exit;
    uint8_t  padding1[6];

    uint32_t exit_reason;
    uint8_t  ready_for_interrupt_injection;
    uint8_t  if_flag;
    uint16_t flags;

    uint64_t cr8;
    uint64_t apic_base;

    union {
        struct {
            uint64_t hardware_exit_reason;
        } hw;
        struct {
            uint64_t hardware_entry_failure_reason;
            uint32_t cpu;
        } fail_entry;
        struct {
            uint32_t exception;
            uint32_t error_code;
        } ex;
        struct {
            uint8_t  direction;
            uint8_t  size;
            uint16_t port;
            uint32_t count;
            uint64_t data_offset;
        } io;
        struct {
            struct kvm_debug_exit_arch arch;
        } debug;
        struct {
            uint64_t phys_addr;
            uint8_t  data[8];
            uint32_t len;
            uint8_t  is_write;
        } mmio;
        struct {
            uint64_t nr;
            uint64_t args[6];
            uint64_t ret;
            union {
                uint32_t longmode;
                uint64_t flags;
            };
        } hypercall;
        struct {
            uint64_t rip;
            uint32_t is_write;
            uint32_t pad;
        } tpr_access;
        struct {
            uint32_t suberror;
            uint32_t ndata;
            uint64_t data[16];
        } internal;
        struct {
            uint32_t type;
            uint32_t ndata;
            union {
                uint64_t flags;
                uint64_t data[16];
            };
        } system_event;
        struct {
            uint8_t vector;
        } eoi;
        struct {
            uint8_t  error;
            uint8_t  pad[7];
            uint32_t reason;
            uint32_t index;
            uint64_t data;
        } msr;
        struct {
            uint32_t flags;
        } notify;
        struct {
            uint64_t flags;
            uint64_t gpa;
            uint64_t size;
        } memory_fault;
        char padding[256];
    };

    uint64_t kvm_valid_regs;
    uint64_t kvm_dirty_regs;
    union {
        struct kvm_sync_regs regs;
        char padding[2048];
    } s;
};

struct kvm_userspace_memory_region {
    uint32_t slot;
    uint32_t flags;
    uint64_t guest_phys_addr;
    uint64_t memory_size;
    uint64_t userspace_addr;
};

/* KVM_SET_USER_MEMORY_REGION2 (KVM_CAP_USER_MEMORY2): the first five fields as above, then a
   guest_memfd binding (used with KVM_MEM_GUEST_MEMFD) and room for later fields. */
struct kvm_userspace_memory_region2 {
    uint32_t slot;
    uint32_t flags;
    uint64_t guest_phys_addr;
    uint64_t memory_size;
    uint64_t userspace_addr;
    uint64_t guest_memfd_offset;
    uint32_t guest_memfd;
    uint32_t pad1;
    uint64_t pad2[14];
};

/* KVM_CREATE_GUEST_MEMFD (KVM_CAP_GUEST_MEMFD): returns a new fd of guest-only memory. */
struct kvm_create_guest_memfd {
    uint64_t size;
    uint64_t flags;
    uint64_t reserved[6];
};

struct kvm_ioeventfd {
    uint64_t datamatch;
    uint64_t addr;
    uint32_t len;
    int32_t  fd;
    uint32_t flags;
    uint8_t  pad[36];
};

struct kvm_irqfd {
    uint32_t fd;
    uint32_t gsi;
    uint32_t flags;
    uint32_t resamplefd;
    uint8_t  pad[16];
};

struct kvm_irq_level {
    union {
        uint32_t irq;
        int32_t  status;
    };
    uint32_t level;
};

struct kvm_msi {
    uint32_t address_lo;
    uint32_t address_hi;
    uint32_t data;
    uint32_t flags;
    uint32_t devid;
    uint8_t  pad[12];
};

struct kvm_irq_routing_irqchip {
    uint32_t irqchip;
    uint32_t pin;
};

struct kvm_irq_routing_msi {
    uint32_t address_lo;
    uint32_t address_hi;
    uint32_t data;
    uint32_t devid;
};

struct kvm_irq_routing_entry {
    uint32_t gsi;
    uint32_t type;
    uint32_t flags;
    uint32_t pad;
    union {
        struct kvm_irq_routing_irqchip irqchip;
        struct kvm_irq_routing_msi msi;
        uint32_t pad[8];
    } u;
};

struct kvm_irq_routing {
    uint32_t nr;
    uint32_t flags;
    struct kvm_irq_routing_entry entries[];
};

struct kvm_enable_cap {
    uint32_t cap;
    uint32_t flags;
    uint64_t args[4];
    uint8_t  pad[64];
};

struct kvm_mp_state {
    uint32_t mp_state;
};

struct kvm_dirty_log {
    uint32_t slot;
    uint32_t padding1;
    union {
        void    *dirty_bitmap;
        uint64_t padding2;
    };
};

struct kvm_clear_dirty_log {
    uint32_t slot;
    uint32_t num_pages;
    uint64_t first_page;
    union {
        void    *dirty_bitmap;
        uint64_t padding2;
    };
};

struct kvm_signal_mask {
    uint32_t len;
    uint8_t  sigset[];
};

struct kvm_stats_header {
    uint32_t flags;
    uint32_t name_size;
    uint32_t num_desc;
    uint32_t id_offset;
    uint32_t desc_offset;
    uint32_t data_offset;
};

struct kvm_stats_desc {
    uint32_t flags;
    int16_t  exponent;
    uint16_t size;
    uint32_t offset;
    uint32_t bucket_size;
    char     name[];
};

struct kvm_coalesced_mmio_zone {
    uint64_t addr;
    uint32_t size;
    union {
        uint32_t pad;
        uint32_t pio;
    };
};

struct kvm_coalesced_mmio {
    uint64_t phys_addr;
    uint32_t len;
    union {
        uint32_t pad;
        uint32_t pio;
    };
    uint8_t  data[8];
};

struct kvm_coalesced_mmio_ring {
    uint32_t first, last;
    struct kvm_coalesced_mmio coalesced_mmio[];
};

/* -- guest debugging (KVM_SET_GUEST_DEBUG, KVM_TRANSLATE) -- */

struct kvm_guest_debug_arch {
    uint64_t debugreg[8];
};

struct kvm_guest_debug {
    uint32_t control;
    uint32_t pad;
    struct kvm_guest_debug_arch arch;
};

struct kvm_translation {
    uint64_t linear_address;
    uint64_t physical_address;
    uint8_t  valid;
    uint8_t  writeable;
    uint8_t  usermode;
    uint8_t  pad[5];
};

/* ---- x86 state: dirty-page rings (pyvmm.state.dirty_ring) ----
 * One entry of a vCPU's dirty ring, mmapped from the vCPU fd at page KVM_DIRTY_LOG_PAGE_OFFSET. */
struct kvm_dirty_gfn {
    uint32_t flags;
    uint32_t slot;
    uint64_t offset;
};

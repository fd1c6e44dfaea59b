"""notify -> interrupt round trips: an ioeventfd in, an irqfd out, a Python device between."""

from __future__ import annotations

import pytest

from pyvmm import IoEventAddress, Machine

PORT = 0x520


@pytest.mark.parametrize("gsi", [5, 16])
def test_every_notify_gets_its_interrupt(kvm, gsi):
    rounds = 300
    with Machine(kvm=kvm, irqchip=True) as m:
        irq = m.interrupt(gsi)

        def complete(bell, rings):
            for _ in range(rings):
                irq.trigger()

        bell = m.doorbell(IoEventAddress.pio(PORT), length=1, callback=complete)
        m.load("pingpong", regs={"rcx": rounds, "r8": PORT, "r9": gsi})
        result = m.run(timeout=60)
        # On a stall, say where: rings the device saw, irqfd writes, interrupts the guest took.
        taken = m.memory.read_u64(m.payload.symbol("irq_count"))
        assert result.ok, f"{result}\nrings {bell.count}, irqfd writes {irq.count}, taken {taken}"
        handled = [r for r in result.reports if r.tag == 0x99]
        assert handled and handled[0].value == rounds  # the guest's handler ran every time
        assert bell.count == rounds
        assert irq.count == rounds
        assert sum(result.exits.values()) == 2  # only REPORT and DONE reached userspace


def test_missing_interrupt_is_caught_by_the_timeout(kvm):
    """No device answers the doorbell: the guest waits in hlt and the run times out."""
    with Machine(kvm=kvm, irqchip=True) as m:
        m.doorbell(IoEventAddress.pio(PORT), length=1)
        m.load("pingpong", regs={"rcx": 3, "r8": PORT, "r9": 5})
        result = m.run(timeout=0.5)
        assert result.stop == "timeout"


def test_interrupt_needs_irqchip(kvm):
    with Machine(kvm=kvm) as m, pytest.raises(ValueError, match="irqchip"):
        m.interrupt(5)


def test_msi_interrupts_reach_the_guest(kvm):
    """The same round trip with the irqfd's GSI routed to an MSI (vector 0x40 straight to the
    local APIC): the guest's IOAPIC programming of pin 23 is then unused."""
    rounds = 200
    with Machine(kvm=kvm, irqchip=True) as m:
        irq = m.msi_interrupt(0x40)
        assert irq.gsi >= 24
        second = m.msi_interrupt(0x41)   # a second route keeps the first one in the table
        bell = m.doorbell(IoEventAddress.pio(PORT), length=1,
                          callback=lambda b, n: [irq.trigger() for _ in range(n)])
        m.load("pingpong", regs={"rcx": rounds, "r8": PORT, "r9": 23})
        result = m.run(timeout=60)
        assert result.ok, result
        assert [r.value for r in result.reports if r.tag == 0x99] == [rounds]
        assert bell.count == irq.count == rounds and second.count == 0
        with pytest.raises(ValueError, match="16..255"):
            m.msi_interrupt(3)

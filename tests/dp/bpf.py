"""A small classic-BPF interpreter for the instructions the dp emits: pure tests of its programs
(the live tests attach them to real sockets)."""

from __future__ import annotations

from collections.abc import Sequence

from flowmap_dp.capture import (
    BPF_ALU_AND_K, BPF_JA, BPF_JEQ_K, BPF_JSET_K, BPF_LD_B_ABS, BPF_LD_H_ABS, BPF_LD_H_IND, BPF_LD_W_ABS,
    BPF_LDX_B_MSH, BPF_RET_K, ETH_P_IP, ETH_P_IPV6, SKF_AD_PKTTYPE, SKF_AD_PROTOCOL, SKF_NET_OFF, Insn,
)


def run(prog: Sequence[Insn], frame: bytes, pkttype: int, link_header: int = 14) -> int:
    """What the kernel's classic-BPF interpreter returns for ``frame``, for the instructions
    ``build_filter`` emits; it also checks what the kernel's checker would (jump targets, a final
    return). ``link_header`` is where the network header starts (0: a tunnel without one); the
    packet's protocol is the frame's ethertype, or the IP version's for a raw frame."""
    assert prog[-1][0] == BPF_RET_K and len(prog) <= 4096
    if link_header:
        protocol = int.from_bytes(frame[12:14], "big")
    else:
        protocol = {4: ETH_P_IP, 6: ETH_P_IPV6}.get(frame[0] >> 4, 0)
    a = x = pc = 0

    def load(at: int, size: int) -> int | None:
        if at >= SKF_NET_OFF:
            at = at - SKF_NET_OFF + link_header
        if at + size > len(frame):
            return None  # the kernel drops the frame on a load past its end
        return int.from_bytes(frame[at : at + size], "big")

    while True:
        code, jt, jf, k = prog[pc]
        pc += 1
        if code == BPF_RET_K:
            return k
        if code in (BPF_LD_W_ABS, BPF_LD_H_ABS, BPF_LD_B_ABS, BPF_LD_H_IND):
            if k == SKF_AD_PKTTYPE:
                a = pkttype
            elif k == SKF_AD_PROTOCOL:
                a = protocol
            else:
                size = {BPF_LD_W_ABS: 4, BPF_LD_H_ABS: 2, BPF_LD_B_ABS: 1, BPF_LD_H_IND: 2}[code]
                got = load((k + x) & 0xFFFFFFFF if code == BPF_LD_H_IND else k, size)
                if got is None:
                    return 0
                a = got
        elif code == BPF_ALU_AND_K:
            a &= k
        elif code == BPF_LDX_B_MSH:
            got = load(k, 1)
            if got is None:
                return 0
            x = 4 * (got & 0xF)
        elif code == BPF_JA:
            pc += k
        elif code in (BPF_JEQ_K, BPF_JSET_K):
            assert jt <= 255 and jf <= 255
            pc += jt if (a == k if code == BPF_JEQ_K else a & k) else jf
        else:
            raise AssertionError(f"unexpected opcode {code:#x}")
        assert pc < len(prog), "a jump past the end"

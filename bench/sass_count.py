"""Instructions a pixel from a kernel's SASS: what bounds a pass that memory does not.

Pixel kernels are straight-line code (a tile per program, no loop), so their instructions a
pixel are the kernel's instructions over the pixels each thread owns. The ssim kernel walks down
rows: per output pixel (one lane per thread) it runs its row loop's body once, and within it the
horizontal window loop 2R+1 times unless that loop is unrolled (a constexpr radius); loops are
found as backward branches in the disassembly.
"""
import re

from triton.tools.disasm import get_sass

# Triton's disassembly: "control codes<TAB>[@predicate ]OPCODE operands;" and "LBBn:" labels
_INSTRUCTION = re.compile(r"^[0-9a-f-]{2}:\S*\t(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")
_LABEL = re.compile(r"^(LBB\d+):$")
_TARGET = re.compile(r"\bBRA\s+(LBB\d+)")


def instructions(cubin: bytes):
    """[(position, opcode, branch target label or None)] and {label: position}, NOPs dropped."""
    listing, labels = [], {}
    for line in get_sass(cubin).splitlines():
        label = _LABEL.match(line.strip())
        if label:
            labels[label.group(1)] = len(listing)
            continue
        match = _INSTRUCTION.match(line)
        if match and match.group(2) != "NOP":
            target = _TARGET.search(line)
            listing.append((len(listing), match.group(2), target.group(1) if target else None))
    return listing, labels


def loops(listing, labels):
    """(first, last) addresses of each backward branch's body, innermost (shortest) first."""
    bodies = [(labels[target], position) for position, op, target in listing
              if op == "BRA" and target in labels and labels[target] < position]
    return sorted(bodies, key=lambda body: body[1] - body[0])


def per_pixel(cubin: bytes, pixels_per_thread=None, window=None) -> dict:
    """Static instruction count and instructions a pixel: for a straight-line kernel, the count
    over `pixels_per_thread`; for the ssim kernel, its row loop's body plus window - 1 more runs
    of the window loop's body where that loop remains."""
    listing, labels = instructions(cubin)
    sizes = [last - first + 1 for first, last in loops(listing, labels)]
    out = dict(sass_instructions=len(listing), loops=len(sizes))
    if pixels_per_thread is not None and not sizes:
        out["instructions_per_pixel"] = round(len(listing) / pixels_per_thread, 1)
    elif window is not None and sizes:
        out["instructions_per_pixel"] = max(sizes) + (window - 1) * (min(sizes) if len(sizes) > 1 else 0)
    return out

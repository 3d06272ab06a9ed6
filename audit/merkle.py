"""RFC 6962 Merkle tree hashes, inclusion proofs and consistency proofs.

Leaves are audit records: ``leaf_hash(bytes.fromhex(record.hash))``. The tree hash
(MTH), audit paths (PATH) and consistency proofs (PROOF/SUBPROOF) follow RFC 6962
section 2.1; the verification procedures are the ones RFC 9162 section 2.1.3.2 and
2.1.4.2 spell out, which check exactly what RFC 6962 proofs promise.

``Accumulator`` keeps only the perfect subtrees on the tree's right edge (the
"compact range"), so a verifier streaming 10^5 records computes every checkpoint's
root in one pass, and a checkpoint can store its frontier so the next one (or a
verifier starting after pruned records) continues from there.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

EMPTY_ROOT = hashlib.sha256(b"").digest()


def leaf_hash(data: bytes) -> bytes:
    """SHA-256(0x00 || data)."""
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """SHA-256(0x01 || left || right)."""
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two strictly smaller than ``n`` (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def root(leaves: Sequence[bytes]) -> bytes:
    """MTH over already leaf-hashed entries."""
    n = len(leaves)
    if n == 0:
        return EMPTY_ROOT
    if n == 1:
        return leaves[0]
    k = _split(n)
    return node_hash(root(leaves[:k]), root(leaves[k:]))


def inclusion_proof(index: int, leaves: Sequence[bytes]) -> list[bytes]:
    """PATH(index, D[n]): the audit path for the leaf at ``index``."""
    n = len(leaves)
    if not 0 <= index < n:
        raise ValueError("leaf index out of range")
    if n == 1:
        return []
    k = _split(n)
    if index < k:
        return [*inclusion_proof(index, leaves[:k]), root(leaves[k:])]
    return [*inclusion_proof(index - k, leaves[k:]), root(leaves[:k])]


def consistency_proof(old_size: int, leaves: Sequence[bytes]) -> list[bytes]:
    """PROOF(m, D[n]) with m = ``old_size`` and n = len(leaves)."""
    n = len(leaves)
    if not 0 < old_size <= n:
        raise ValueError("old tree size must be between 1 and the new size")
    return _subproof(old_size, leaves, True)


def _subproof(m: int, leaves: Sequence[bytes], complete: bool) -> list[bytes]:
    n = len(leaves)
    if m == n:
        return [] if complete else [root(leaves)]
    k = _split(n)
    if m <= k:
        return [*_subproof(m, leaves[:k], complete), root(leaves[k:])]
    return [*_subproof(m - k, leaves[k:], False), root(leaves[:k])]


def verify_inclusion(
    leaf: bytes, index: int, tree_size: int, proof: Sequence[bytes], root_hash: bytes
) -> bool:
    """True when ``proof`` shows ``leaf`` (leaf-hashed) sits at ``index`` of the tree with ``root_hash``."""
    if not 0 <= index < tree_size:
        return False
    fn, sn, r = index, tree_size - 1, leaf
    for p in proof:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while not (fn & 1 or fn == 0):
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root_hash


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> bool:
    """True when ``proof`` shows the tree of ``old_size`` is a prefix of the tree of ``new_size``."""
    if old_size < 1 or old_size > new_size:
        return False
    if old_size == new_size:
        return not proof and old_root == new_root
    path = list(proof)
    if old_size & (old_size - 1) == 0:  # a power of two: the old root is itself a node of the new tree
        path.insert(0, old_root)
    if not path:
        return False
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while not (fn & 1 or fn == 0):
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return fr == old_root and sr == new_root and sn == 0


class Accumulator:
    """An append-only tree that remembers only its right-edge perfect subtrees.

    ``frontier`` holds one hash per set bit of ``size``, largest subtree first; folding it
    from the right gives MTH, because RFC 6962 splits at the largest power of two.
    """

    def __init__(self, size: int = 0, frontier: Iterable[bytes] = ()) -> None:
        self.size = size
        self._stack: list[tuple[int, bytes]] = []
        hashes = list(frontier)
        widths = [1 << b for b in range(size.bit_length() - 1, -1, -1) if size >> b & 1]
        if len(widths) != len(hashes):
            raise ValueError("frontier does not match the tree size")
        self._stack = list(zip(widths, hashes, strict=True))

    def append(self, leaf: bytes) -> None:
        """Add one leaf-hashed entry."""
        width, h = 1, leaf
        stack = self._stack
        while stack and stack[-1][0] == width:
            w, left = stack.pop()
            h = node_hash(left, h)
            width += w
        stack.append((width, h))
        self.size += 1

    def root(self) -> bytes:
        if not self._stack:
            return EMPTY_ROOT
        r = self._stack[-1][1]
        for _, h in reversed(self._stack[:-1]):
            r = node_hash(h, r)
        return r

    @property
    def frontier(self) -> list[bytes]:
        return [h for _, h in self._stack]

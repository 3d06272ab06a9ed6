"""RFC 6962 Merkle trees: roots, audit paths and consistency proofs against hand-built trees."""

from __future__ import annotations

import hashlib

import pytest

from audit import merkle


def H(b: bytes) -> bytes:
    return hashlib.sha256(b).digest()


def leaf(i: int) -> bytes:
    return H(b"\x00" + bytes([i]))


def node(a: bytes, b: bytes) -> bytes:
    return H(b"\x01" + a + b)


# The seven-leaf tree of RFC 6962 section 2.1.3, node names as in the RFC.
a, b, c, d, e, f, j = (leaf(i) for i in range(7))
(
    g,
    h,
    i_,
) = node(a, b), node(c, d), node(e, f)
k, l_ = node(g, h), node(i_, j)
ROOT7 = node(k, l_)
LEAVES7 = [a, b, c, d, e, f, j]


def test_root_matches_hand_built_trees() -> None:
    assert merkle.root([]) == H(b"")
    assert merkle.root([a]) == a
    assert merkle.root([a, b]) == g
    assert merkle.root([a, b, c]) == node(g, c)
    assert merkle.root(LEAVES7) == ROOT7
    assert merkle.leaf_hash(bytes([3])) == d


def test_audit_paths_are_the_rfc_examples() -> None:
    assert merkle.inclusion_proof(0, LEAVES7) == [b, h, l_]
    assert merkle.inclusion_proof(3, LEAVES7) == [c, g, l_]
    assert merkle.inclusion_proof(4, LEAVES7) == [f, j, k]
    assert merkle.inclusion_proof(6, LEAVES7) == [i_, k]


def test_consistency_proofs_are_the_rfc_examples() -> None:
    assert merkle.consistency_proof(3, LEAVES7) == [c, d, g, l_]
    assert merkle.consistency_proof(4, LEAVES7) == [l_]
    assert merkle.consistency_proof(6, LEAVES7) == [i_, j, k]


@pytest.mark.parametrize("n", range(1, 18))
def test_every_inclusion_proof_verifies_and_a_wrong_one_does_not(n: int) -> None:
    leaves = [leaf(x) for x in range(n)]
    root = merkle.root(leaves)
    for m in range(n):
        proof = merkle.inclusion_proof(m, leaves)
        assert merkle.verify_inclusion(leaves[m], m, n, proof, root)
        assert not merkle.verify_inclusion(leaf(200), m, n, proof, root)
        if proof:
            bad = [*proof[:-1], H(proof[-1])]
            assert not merkle.verify_inclusion(leaves[m], m, n, bad, root)
        if n > 1:
            assert not merkle.verify_inclusion(leaves[m], (m + 1) % n, n, proof, root)


@pytest.mark.parametrize("n", range(1, 18))
def test_every_consistency_proof_verifies_and_a_forked_tree_does_not(n: int) -> None:
    leaves = [leaf(x) for x in range(n)]
    new_root = merkle.root(leaves)
    for m in range(1, n + 1):
        proof = merkle.consistency_proof(m, leaves)
        old_root = merkle.root(leaves[:m])
        assert merkle.verify_consistency(m, n, old_root, new_root, proof)
        forked_old = merkle.root([*leaves[: m - 1], leaf(250)])
        assert not merkle.verify_consistency(m, n, forked_old, new_root, proof)
        if m < n:
            assert not merkle.verify_consistency(m, n, old_root, H(new_root), proof)


def test_accumulator_gives_the_same_roots_and_resumes_from_its_frontier() -> None:
    acc = merkle.Accumulator()
    leaves = [leaf(x) for x in range(40)]
    for n, lf in enumerate(leaves, 1):
        acc.append(lf)
        assert acc.root() == merkle.root(leaves[:n])
        resumed = merkle.Accumulator(acc.size, acc.frontier)
        assert resumed.root() == acc.root()
    with pytest.raises(ValueError):
        merkle.Accumulator(5, [a])

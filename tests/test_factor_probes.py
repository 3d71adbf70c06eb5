"""DCoDR's evaluation: the MLP factor probes (fastipirm.eval.factor_probes) and the top-1
retrieval (fastipirm.eval.retrieval), on synthetic codes drawn fresh every run."""
import bisect
import math

import pytest
import torch

from fastipirm.eval.factor_probes import LR_GAMMA, LR_MILESTONES, ProbeMLP, probe_factors
from fastipirm.eval.retrieval import retrieval_rules, retrieval_top1, top1_neighbours


def _codes(n, d, gen):
    return torch.randn(n, d, generator=gen)


def _split(x, n):
    return x[:n], x[n:]


# ----------------------------------------------------------------------------- the probe model

def test_probe_architecture_is_the_official_layer_list():
    m = ProbeMLP(7, 5)
    expected = [
        ("Linear", 7, 128, False), ("BatchNorm1d", 128), ("LeakyReLU", 0.01),
        ("Linear", 128, 128, False), ("BatchNorm1d", 128), ("LeakyReLU", 0.01),
        ("Linear", 128, 128, False), ("BatchNorm1d", 128), ("LeakyReLU", 0.01),
        ("Linear", 128, 128, False), ("BatchNorm1d", 128), ("LeakyReLU", 0.01),
        ("Linear", 128, 128, False), ("BatchNorm1d", 128), ("LeakyReLU", 0.01),
        ("Linear", 128, 5, True),
    ]
    got = []
    for layer in m.predictor:
        if isinstance(layer, torch.nn.Linear):
            got.append(("Linear", layer.in_features, layer.out_features, layer.bias is not None))
        elif isinstance(layer, torch.nn.BatchNorm1d):
            got.append(("BatchNorm1d", layer.num_features))
        elif isinstance(layer, torch.nn.LeakyReLU):
            got.append(("LeakyReLU", layer.negative_slope))
        else:
            got.append((type(layer).__name__,))
    assert got == expected
    assert "predictor.15.bias" in m.state_dict() and "predictor.0.bias" not in m.state_dict()
    assert m(torch.randn(4, 7)).shape == (4, 5)


# ----------------------------------------------------------------------------- probes

def test_probes_learn_decodable_factors_and_not_independent_ones(seed, one_thread):
    gen = torch.Generator().manual_seed(seed)
    n_train, n_test, d = 1200, 500, 8
    x = _codes(n_train + n_test, d, gen)
    w = torch.randn(d, 3, generator=gen)
    linear = (x @ w).argmax(1)                                   # scale-invariant, linear
    xor = ((x[:, 0] > 0) ^ (x[:, 1] > 0)).long()                 # not linearly decodable
    noise = torch.randint(0, 4, (n_train + n_test,), generator=gen)
    u = x / x.norm(dim=1, keepdim=True)
    target = torch.stack([20 * u[:, 2] + 3, 10 * u[:, 3].abs()], 1)
    tr = {"linear": linear[:n_train], "xor": xor[:n_train], "noise": noise[:n_train]}
    te = {"linear": linear[n_train:], "xor": xor[n_train:], "noise": noise[n_train:]}
    res = probe_factors(x[:n_train], tr, x[n_train:], te, domain_factor="noise",
                        targets=({"t": target[:n_train]}, {"t": target[n_train:]}),
                        seed=seed, max_epochs=30, log=None)
    p = res["probes"]
    # (over 24 seeds: linear 0.90-0.95, xor 0.85-0.91, noise within 0.035 of 0.25, L1 / baseline
    # 0.06-0.09)
    assert p["linear"]["accuracy"] > 0.8, p["linear"]
    assert p["xor"]["accuracy"] > 0.75, p["xor"]
    # independent of the codes: at chance on the test split (4 sigma is about 0.08)
    assert abs(p["noise"]["accuracy"] - 0.25) < 0.08, p["noise"]
    assert p["t"]["l1"] < 0.4 * p["t"]["baseline_l1"], p["t"]
    assert res["invariance"] == p["noise"]["accuracy"]
    assert set(res["informativeness"]) == {"linear", "xor"}
    assert res["l1_errors"] == {"t": p["t"]["l1"]}
    assert res["num_val"] == math.ceil(0.1 * n_train)
    assert res["num_train"] + res["num_val"] == n_train
    # chance: the majority-class rate over train + test, and 1 / classes
    counts = torch.bincount(noise)
    assert p["noise"]["chance"] == pytest.approx(counts.max().item() / noise.numel())
    assert p["noise"]["chance_uniform"] == pytest.approx(0.25)
    assert p["noise"]["majority_rates"][-1] == pytest.approx(1.0)
    # the train-mean baseline
    mean = target[:n_train].double().mean(0)
    assert p["t"]["baseline_l1"] == pytest.approx(
        (target[n_train:].double() - mean).abs().mean().item())


def test_early_stopping_stops_on_noise_and_keeps_the_best_epoch(seed, one_thread):
    gen = torch.Generator().manual_seed(seed)
    n_train, n_test, patience = 300, 100, 7
    x = _codes(n_train + n_test, 6, gen)
    y = torch.randint(0, 3, (n_train + n_test,), generator=gen)
    res = probe_factors(x[:n_train], {"y": y[:n_train]}, x[n_train:], {"y": y[n_train:]},
                        domain_factor="y", seed=seed, max_epochs=100, patience=patience,
                        history=True, log=None)
    p = res["probes"]["y"]
    hist = p["history"]
    assert p["stopped_early"] and p["epochs"] < 100
    assert len(hist) == p["epochs"]
    accs = [h["val_accuracy"] for h in hist]
    best = max(range(len(accs)), key=lambda i: (accs[i], -i))   # first epoch of the best
    assert p["best_epoch"] == best + 1
    assert p["val_accuracy"] == accs[best]
    # official rule: stop at the first epoch e with e - best(e) > patience (0-based)
    assert p["epochs"] == p["best_epoch"] + patience + 1
    for e in range(len(accs) - 1):
        b = max(range(e + 1), key=lambda i: (accs[i], -i))
        assert e - b <= patience
    # classification losses stay far below the first milestone: the lr never changes
    assert all(h["lr"] == 1e-3 for h in hist)


def test_lr_follows_the_training_loss_as_official_multisteplr(seed, one_thread):
    gen = torch.Generator().manual_seed(seed)
    n = 400
    x = _codes(n + 100, 5, gen)
    dom = torch.randint(0, 2, (n + 100,), generator=gen)
    target = 60 + 10 * torch.randn(n + 100, 3, generator=gen)    # L1 of an untrained probe ~60
    res = probe_factors(x[:n], {"d": dom[:n]}, x[n:], {"d": dom[n:]}, domain_factor="d",
                        targets={"t": (target[:n], target[n:])}, seed=seed, max_epochs=6,
                        history=True, log=None)
    hist = res["probes"]["t"]["history"]
    assert hist[0]["lr"] == 1e-3
    assert hist[0]["train_loss"] > 25
    for prev, cur in zip(hist, hist[1:]):
        k = bisect.bisect_right(LR_MILESTONES, prev["train_loss"])
        assert cur["lr"] == pytest.approx(1e-3 * LR_GAMMA ** k, rel=1e-12)
    assert hist[1]["lr"] < 1e-3


def test_probes_are_deterministic_given_the_seed(seed, one_thread):
    gen = torch.Generator().manual_seed(seed)
    x = _codes(200, 4, gen)
    y = torch.randint(0, 3, (200,), generator=gen)
    args = (x[:150], {"y": y[:150]}, x[150:], {"y": y[150:]})
    kw = dict(domain_factor="y", max_epochs=3, history=True, log=None)
    a = probe_factors(*args, seed=seed, **kw)
    b = probe_factors(*args, seed=torch.Generator().manual_seed(0), **kw)
    c = probe_factors(*args, seed=seed, **kw)
    assert a["probes"] == c["probes"]
    assert a["probes"]["y"]["history"] != b["probes"]["y"]["history"]


def test_probe_input_errors():
    x = torch.randn(20, 3)
    y = torch.randint(0, 2, (20,))
    y[0], y[1] = 0, 1
    ok = dict(domain_factor="y", max_epochs=1, log=None)
    with pytest.raises(ValueError, match="unknown domain factor 'z'"):
        probe_factors(x, {"y": y}, x, {"y": y}, domain_factor="z", max_epochs=1, log=None)
    with pytest.raises(ValueError, match=r"train factor 'y' must have shape \(20,\)"):
        probe_factors(x, {"y": y[:19]}, x, {"y": y}, **ok)
    with pytest.raises(ValueError, match="the test split is empty"):
        probe_factors(x, {"y": y}, x[:0], {"y": y[:0]}, **ok)
    with pytest.raises(ValueError, match="takes one value only"):
        probe_factors(x, {"y": y, "c": torch.zeros(20, dtype=torch.long)}, x,
                      {"y": y, "c": torch.zeros(20, dtype=torch.long)}, **ok)
    with pytest.raises(ValueError, match="train codes have 3 dimensions and test codes 2"):
        probe_factors(x, {"y": y}, x[:, :2], {"y": y}, **ok)
    with pytest.raises(ValueError, match="continuous factors go in targets"):
        probe_factors(x, {"y": y, "f": torch.rand(20)}, x, {"y": y, "f": torch.rand(20)}, **ok)
    with pytest.raises(ValueError, match="train and test factors differ"):
        probe_factors(x, {"y": y, "w": y}, x, {"y": y}, **ok)
    with pytest.raises(ValueError, match=r"test target 't' must have shape \(20, k\)"):
        probe_factors(x, {"y": y}, x, {"y": y}, targets={"t": (torch.rand(20, 2),
                                                                torch.rand(19, 2))}, **ok)
    with pytest.raises(ValueError, match="at least 3"):
        probe_factors(x[:2], {"y": y[:2]}, x, {"y": y}, **ok)


# ----------------------------------------------------------------------------- retrieval

def _brute_force_retrieval(train_codes, train_f, test_codes, test_f, allowed, cyclic):
    """Explicit per-query loop: nearest other code among train + test, then the rules."""
    gallery = torch.cat([train_codes, test_codes]).double()
    gallery = gallery / gallery.norm(dim=1, keepdim=True)
    g_f = {k: torch.cat([train_f[k], test_f[k]]).tolist() for k in allowed}
    sizes = {k: len(set(g_f[k])) for k in cyclic}
    n_tr = train_codes.shape[0]
    hits = {k: 0 for k in [*allowed, "all"]}
    neighbours = []
    for i in range(test_codes.shape[0]):
        qi = n_tr + i
        best_j, best_d = None, math.inf
        for j in range(gallery.shape[0]):
            if j == qi:
                continue
            dist = math.sqrt(sum((float(a) - float(b)) ** 2
                                 for a, b in zip(gallery[qi], gallery[j])))
            if dist < best_d:
                best_j, best_d = j, dist
        neighbours.append(best_j)
        all_ok = True
        for k, limit in allowed.items():
            diff = abs(g_f[k][qi] - g_f[k][best_j])
            if k in sizes:
                diff = min(diff, sizes[k] - diff)
            ok = diff <= limit
            hits[k] += ok
            all_ok = all_ok and ok
        hits["all"] += all_ok
    q = test_codes.shape[0]
    return {k: v / q for k, v in hits.items()}, neighbours


def test_retrieval_matches_a_brute_force_loop(seed):
    gen = torch.Generator().manual_seed(seed)
    n_tr, n_te = 120, 40
    n = n_tr + n_te
    az = torch.randint(0, 18, (n,), generator=gen)
    el = torch.randint(0, 3, (n,), generator=gen)
    li = torch.randint(0, 2, (n,), generator=gen)
    obj = torch.randint(0, 5, (n,), generator=gen)
    ang = 2 * math.pi * az.double() / 18
    codes = torch.stack([torch.cos(ang), torch.sin(ang), 0.3 * el.double(), 0.1 * li.double()], 1)
    codes = torch.cat([codes, 0.05 * torch.randn(n, 3, generator=gen, dtype=torch.float64)], 1)
    factors = {"object": obj, "azimuth": az, "elevation": el, "lighting": li}
    tr = {k: v[:n_tr] for k, v in factors.items()}
    te = {k: v[n_tr:] for k, v in factors.items()}
    allowed, cyclic = retrieval_rules("smallnorb/test", factors, "object")
    assert allowed == {"azimuth": 2, "elevation": 0, "lighting": 0} and cyclic == ("azimuth",)
    res = retrieval_top1(codes[:n_tr], tr, codes[n_tr:], te, allowed=allowed, cyclic=cyclic,
                         chunk=7)
    ref, ref_nn = _brute_force_retrieval(codes[:n_tr], tr, codes[n_tr:], te, allowed, cyclic)
    assert res["top1"] == pytest.approx(ref, abs=1e-12)
    assert res["modulo"] == {"azimuth": len(set(az.tolist()))}
    assert res["top1"]["azimuth"] > 0.5                 # the codes do carry the azimuth
    # the literal official rule (skip whatever ranks first) agrees when no code is duplicated
    lit = retrieval_top1(codes[:n_tr], tr, codes[n_tr:], te, allowed=allowed, cyclic=cyclic,
                         skip="rank0")
    assert lit["top1"] == res["top1"]
    gallery = torch.nn.functional.normalize(codes, dim=1)
    idx = top1_neighbours(gallery[n_tr:], gallery, skip_first=True, chunk=5)
    assert idx.tolist() == ref_nn


def test_retrieval_rules_and_errors():
    a, c = retrieval_rules("shapes3d", ["floor_hue", "wall_hue", "shape", "scale"], "shape")
    assert a == {"floor_hue": 0, "wall_hue": 0, "scale": 0} and c == ()
    assert retrieval_rules("cars3d/test", ["car", "pose"], "car") == ({"pose": 0}, ())
    with pytest.raises(ValueError, match=r"need the factors \['gender', 'shoe_type'\]"):
        retrieval_rules("edges2shoes", ["modality"], "modality")
    x = torch.randn(10, 3)
    f = {"a": torch.arange(10)}
    with pytest.raises(ValueError, match="test factors lack 'b'"):
        retrieval_top1(x, {"b": f["a"]}, x, f, allowed={"b": 0})
    with pytest.raises(ValueError, match="cyclic attributes"):
        retrieval_top1(x, f, x, f, allowed={"a": 0}, cyclic=("z",))
    with pytest.raises(ValueError, match=r"train factor 'a' must have shape \(10,\)"):
        retrieval_top1(x, {"a": f["a"][:9]}, x, f, allowed={"a": 0})
    with pytest.raises(ValueError, match="skip must be"):
        retrieval_top1(x, f, x, f, allowed={"a": 0}, skip="other")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_probes_and_retrieval_on_cuda(seed):
    gen = torch.Generator().manual_seed(seed)
    x = _codes(600, 6, gen)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    args = (x[:450], {"y": y[:450]}, x[450:], {"y": y[450:]})
    kw = dict(domain_factor="y", seed=seed, max_epochs=8, device="cuda", log=None)
    a, b = probe_factors(*args, **kw), probe_factors(*args, **kw)
    assert a["probes"] == b["probes"]
    assert a["probes"]["y"]["accuracy"] > 0.7
    xd = x.double()
    cpu = retrieval_top1(xd[:450], args[1], xd[450:], args[3], allowed={"y": 0})
    gpu = retrieval_top1(xd[:450], args[1], xd[450:], args[3], allowed={"y": 0}, device="cuda")
    assert gpu["top1"] == cpu["top1"]

"""The method registry is the one description of the methods: options, defaults, statistics."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

import armor
from armor.solvers import get_method
from armor.solvers.armor import FaithfulSettings
from armor.solvers.armor_fast import SweepSettings


@pytest.mark.parametrize("name", list(armor.METHODS))
def test_registry_matches_the_solver_signatures(name):
    """Every registered option reaches the solver with the registry's default, and the solver takes nothing else
    (bar the pattern, the progress callback and the full Hessian): nothing is described in two places
    differently.  The ARMOR solvers take ``**options`` and build their settings object from the same table."""
    method = armor.METHODS[name]
    params = inspect.signature(method.solve).parameters
    solver_opts = {
        k: p.default for k, p in params.items()
        if (p.kind is p.KEYWORD_ONLY or p.default is not p.empty) and k not in ("n", "m", "callback", "hessian")
    }
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        settings = {"armor": FaithfulSettings, "armor-fast": SweepSettings, "armor-bh": SweepSettings}[name]
        assert solver_opts == {} and method.options is settings.TABLE
        fields = [f.name for f in dataclasses.fields(settings)]
        assert fields == [o.name for o in method.options]
        assert all(f.default is dataclasses.MISSING for f in dataclasses.fields(settings))  # no second default
        assert dataclasses.asdict(settings.from_options()) == method.resolve()
        assert settings.from_options(patience="3").patience == 3
        with pytest.raises(TypeError, match="takes no option 'colour'"):
            settings.from_options(colour=0)
    else:
        assert {o.name: o.default for o in method.options} == solver_opts


def test_option_conversion_and_errors():
    fast = get_method("armor-fast")
    assert fast.resolve({"sweeps": "7", "max_seconds": "none"})["sweeps"] == 7
    assert fast.resolve({"max_seconds": "none"})["max_seconds"] is None
    with pytest.raises(ValueError, match="option 'sweeps' must be an integer, got 'many'"):
        fast.resolve({"sweeps": "many"})
    with pytest.raises(ValueError, match="option 'damping' must be a number, got 'tiny'"):
        fast.resolve({"damping": "tiny"})
    with pytest.raises(ValueError, match="must be an integer"):
        fast.resolve({"sweeps": 2.5})
    with pytest.raises(TypeError, match="takes no option 'seed'"):
        fast.resolve({"seed": 0})  # armor-fast is deterministic: no seed to pollute fingerprints
    with pytest.raises(ValueError, match="unknown method"):
        get_method("obs")
    assert {m: armor.METHODS[m].stats_kind for m in armor.METHODS} == {
        "magnitude": "diagonal", "wanda": "diagonal", "nowag": "diagonal", "sparsegpt": "full",
        "armor": "diagonal", "armor-fast": "diagonal", "armor-bh": "full",
    }


def test_prune_layer_rejects_options_of_another_method():
    w = torch.randn(8, 16)
    with pytest.raises(TypeError, match="column_batch"):
        armor.prune_layer(w, torch.ones(16), "armor-fast", column_batch=8)
    res = armor.prune_layer(w, torch.ones(16), "magnitude")
    assert res.core.shape == (8, 16) and res.a_blocks is None


@pytest.mark.parametrize("method,opts", [("armor", {"iterations": 15}), ("armor-fast", {"sweeps": 4, "patience": 0})])
def test_prune_layer_callback_reports_every_step(method, opts):
    """``callback`` sees every iteration/sweep with the best loss so far: never rising, ending at the result."""
    torch.manual_seed(0)
    w, h = torch.randn(16, 32), torch.rand(32) + 0.1
    seen: list[tuple[int, float]] = []
    res = armor.prune_layer(w, h, method, callback=lambda step, loss: seen.append((step, loss)), **opts)
    assert len(seen) == res.iterations
    losses = [loss for _, loss in seen]
    assert all(b <= a for a, b in zip(losses, losses[1:], strict=False))
    assert losses[-1] == pytest.approx(res.loss)


def test_prune_layer_callback_refused_without_iterations():
    with pytest.raises(TypeError, match="no iterations to report"):
        armor.prune_layer(torch.randn(8, 16), torch.ones(16), "wanda", callback=print)

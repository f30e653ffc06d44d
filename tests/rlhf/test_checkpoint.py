"""Resume checkpoints (rlhf/checkpoint.py) and the non-finite guard (rlhf/guards.py): pure, file-system only."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from rlhf import checkpoint as ckpt
from rlhf.checkpoint import (
    CheckpointError,
    Processes,
    ResumeCheckpoints,
    capture_rng,
    clear,
    config_part,
    fingerprint,
    load_latest,
    load_rank_rng,
    restore_rng,
    save_checkpoint,
    save_rank_rng,
)
from rlhf.guards import NonFiniteError, first_non_finite, require_finite


@dataclass
class Cfg:
    steps: int = 10
    learning_rate: float = 1e-3
    resume_every: int = 5


def trained_state(seed: int = 0) -> dict:
    """A model + AdamW state after one step, as the loops save it."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    model(torch.randn(2, 4)).square().sum().backward()
    optimizer.step()
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": capture_rng(),
        "extras": {"kl_coef": 0.125, "note": "x"},
    }


def assert_same(a, b) -> None:
    """Nested equality with tensors compared exactly."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


# ---------------------------------------------------------------------------------------------------- fingerprint


def test_fingerprint_is_stable_and_sees_params_seed_and_input_contents(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.jsonl").write_text('{"x": 1}\n')
    base = fingerprint(config_part(Cfg()), 0, data)
    assert base == fingerprint(config_part(Cfg()), 0, data) and len(base) == 64
    assert fingerprint({"a": 1, "b": 2}) == fingerprint({"b": 2, "a": 1})  # key order does not matter
    assert fingerprint(config_part(Cfg(resume_every=50)), 0, data) == base  # how often to save: not a result input
    assert fingerprint(config_part(Cfg(learning_rate=2e-3)), 0, data) != base
    assert fingerprint(config_part(Cfg()), 1, data) != base
    (data / "a.jsonl").write_text('{"x": 2}\n')
    assert fingerprint(config_part(Cfg()), 0, data) != base
    (data / "a.jsonl").write_text('{"x": 1}\n')  # same bytes again (as after `dvc checkout`): matches again
    assert fingerprint(config_part(Cfg()), 0, data) == base
    (data / "b.jsonl").write_text("")
    assert fingerprint(config_part(Cfg()), 0, data) != base
    with pytest.raises(TypeError, match="cannot hash"):
        fingerprint(object())


# ------------------------------------------------------------------------------------------------------------ RNG


def draws(generator: torch.Generator) -> tuple:
    return (
        random.random(),
        random.getrandbits(64),
        np.random.rand(3).tolist(),
        np.random.randn(),
        torch.rand(4).tolist(),
        torch.randint(1000, (5,), generator=generator).tolist(),
        torch.randperm(20, generator=generator).tolist(),
    )


def test_restore_rng_makes_the_next_draws_bitwise_identical_after_a_save_and_load(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    generator = torch.Generator().manual_seed(4)
    draws(generator)  # advance every stream, numpy's cached Gaussian included
    np.random.randn()
    state = capture_rng({"batches": generator})
    torch.save(state, tmp_path / "rng.pt")
    expected = draws(generator)
    draws(generator)  # move further on
    restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True), {"batches": generator})
    assert draws(generator) == expected
    with pytest.raises(CheckpointError, match="'other'"):
        restore_rng(state, {"other": torch.Generator()})


# ---------------------------------------------------------------------------------------------------- save / load


def test_save_then_load_round_trips_models_optimiser_rng_and_extras_with_weights_only(tmp_path: Path) -> None:
    folder = tmp_path / "ck"
    state = trained_state()
    path = save_checkpoint(folder, 7, state, "fp")
    assert path == folder / "step-7" and sorted(p.name for p in folder.iterdir()) == ["latest.json", "step-7"]
    assert json.loads((folder / "latest.json").read_text()) == {"step": 7, "dir": "step-7", "fingerprint": "fp"}
    step, loaded = load_latest(folder, "fp")  # load_latest uses torch.load(weights_only=True)
    assert step == 7
    assert_same(state, loaded)
    assert torch.load(path / "state.pt", weights_only=True)["extras"] == {"kl_coef": 0.125, "note": "x"}
    clear(folder)
    assert not folder.exists() and load_latest(folder, "fp") is None


def test_only_the_newest_checkpoints_are_kept(tmp_path: Path) -> None:
    folder = tmp_path / "ck"
    for step in (10, 20, 30):
        save_checkpoint(folder, step, {"step": torch.tensor(step)}, "fp")
    assert sorted(p.name for p in folder.iterdir()) == ["latest.json", "step-30"]
    for step in (40, 50):
        save_checkpoint(folder, step, {"step": torch.tensor(step)}, "fp", keep=2)
    assert sorted(p.name for p in folder.iterdir()) == ["latest.json", "step-40", "step-50"]


def test_a_half_written_checkpoint_is_ignored_and_cleaned_up_by_the_next_save(tmp_path: Path) -> None:
    folder = tmp_path / "ck"
    save_checkpoint(folder, 10, {"w": torch.ones(2)}, "fp")
    # a save killed midway: its temp folder holds a truncated state file and no meta
    partial = folder / "tmp-step-20"
    partial.mkdir()
    (partial / "state.pt").write_bytes(b"PK\x03\x04 truncated")
    step, state = load_latest(folder, "fp")
    assert step == 10 and torch.equal(state["w"], torch.ones(2))
    (folder / "tmp-step-30").mkdir()  # a later step's folder may be in use by other ranks: left alone
    save_checkpoint(folder, 20, {"w": torch.full((2,), 2.0)}, "fp")
    assert sorted(p.name for p in folder.iterdir()) == ["latest.json", "step-20", "tmp-step-30"]
    assert torch.equal(load_latest(folder, "fp")[1]["w"], torch.full((2,), 2.0))


def test_a_crash_while_writing_leaves_the_previous_checkpoint_in_force(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "ck"
    save_checkpoint(folder, 10, {"w": torch.ones(2)}, "fp")
    pointer = (folder / "latest.json").read_text()

    def dies_midway(obj, handle, *args, **kwargs) -> None:
        handle.write(b"partial bytes")
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(ckpt.torch, "save", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(folder, 20, {"w": torch.zeros(2)}, "fp")
    monkeypatch.undo()
    assert (folder / "latest.json").read_text() == pointer and not (folder / "step-20").exists()
    step, state = load_latest(folder, "fp")
    assert step == 10 and torch.equal(state["w"], torch.ones(2))


def test_a_lost_pointer_falls_back_to_the_newest_complete_checkpoint(tmp_path: Path) -> None:
    folder = tmp_path / "ck"
    save_checkpoint(folder, 10, {"w": torch.ones(1)}, "fp", keep=2)
    save_checkpoint(folder, 20, {"w": torch.full((1,), 2.0)}, "fp", keep=2)
    (folder / "latest.json").write_text("{not json")
    assert load_latest(folder, "fp")[0] == 20
    # killed after renaming step-30 into place but before the pointer moved: the pointer (20) wins; a rerun saving
    # step 30 again replaces that folder
    save_checkpoint(folder, 20, {"w": torch.full((1,), 2.0)}, "fp", keep=2)
    (folder / "step-30").mkdir()
    (folder / "step-30" / "meta.json").write_text(json.dumps({"step": 30, "fingerprint": "fp", "format": ckpt.FORMAT}))
    assert load_latest(folder, "fp")[0] == 20
    save_checkpoint(folder, 30, {"w": torch.full((1,), 3.0)}, "fp", keep=2)
    assert torch.equal(load_latest(folder, "fp")[1]["w"], torch.full((1,), 3.0))


def test_a_fingerprint_mismatch_discards_the_checkpoint_and_says_why(tmp_path: Path) -> None:
    folder = tmp_path / "ck"
    save_checkpoint(folder, 10, {"w": torch.ones(1)}, "a" * 64)
    messages: list[str] = []
    assert load_latest(folder, "b" * 64, discard=False, log=messages.append) is None
    assert folder.exists()  # a non-main rank only reports
    assert load_latest(folder, "b" * 64, log=messages.append) is None
    assert not folder.exists()
    assert "step 10" in messages[0] and "other params or inputs" in messages[0] and "starts from step 0" in messages[0]


def test_an_unreadable_checkpoint_is_discarded_not_fatal(tmp_path: Path) -> None:
    folder = tmp_path / "ck"
    save_checkpoint(folder, 10, {"w": torch.ones(1)}, "fp")
    (folder / "step-10" / "state.pt").write_bytes(b"garbage")
    messages: list[str] = []
    assert load_latest(folder, "fp", log=messages.append) is None
    assert "unreadable" in messages[0] and not folder.exists()


def test_per_rank_rng_files_are_written_by_every_rank_and_read_back_by_each(tmp_path: Path) -> None:
    folder = tmp_path / "ck"
    rank_generators = [torch.Generator().manual_seed(1000 + rank) for rank in range(2)]
    expected = []
    for rank, generator in enumerate(rank_generators):  # each process writes its own file (here: in turn)
        torch.manual_seed(rank)
        save_rank_rng(folder, 5, rank, {"shuffle": generator})
        expected.append((torch.rand(3).tolist(), torch.rand(3, generator=generator).tolist()))
    save_checkpoint(folder, 5, {"model": {"w": torch.ones(1)}}, "fp", ranks=2)  # main process only
    assert sorted(p.name for p in (folder / "step-5").iterdir()) == [
        "meta.json",
        "rng-rank0.pt",
        "rng-rank1.pt",
        "state.pt",
    ]
    step, _ = load_latest(folder, "fp")
    for rank in (1, 0):
        generator = torch.Generator()
        load_rank_rng(folder, step, rank, {"shuffle": generator})
        assert (torch.rand(3).tolist(), torch.rand(3, generator=generator).tolist()) == expected[rank]
    with pytest.raises(CheckpointError, match="rng-rank2.pt: missing"):
        load_rank_rng(folder, step, 2)
    save_rank_rng(folder, 10, 0)
    with pytest.raises(CheckpointError, match=r"ranks \[1\] are missing"):
        save_checkpoint(folder, 10, {}, "fp", ranks=2)


def test_checkpointer_saves_every_n_steps_but_not_at_the_end_and_reports_events(tmp_path: Path) -> None:
    events: list[tuple[str, dict]] = []
    saver = ResumeCheckpoints(
        tmp_path / "ck", "fp", every=5, notify=lambda event, fields: events.append((event, fields))
    )
    assert [step for step in range(0, 16) if saver.due(step, 15)] == [5, 10]
    assert not ResumeCheckpoints(tmp_path / "off", "fp", every=0).due(5, 15)
    assert saver.resume() is None and "no checkpoint" in saver.kept()
    saver.save(10, {"w": torch.ones(1)})
    again = ResumeCheckpoints(
        tmp_path / "ck", "fp", every=5, notify=lambda event, fields: events.append((event, fields))
    )
    assert again.resume()[0] == 10 and "step 10" in again.kept()
    assert [(e, f["step"]) for e, f in events] == [("checkpoint", 10), ("resumed", 10)]
    again.clear()
    assert not (tmp_path / "ck").exists()


def test_the_same_manager_serves_several_processes_each_restoring_its_own_rng(tmp_path: Path) -> None:
    """Two ranks, run in turn here (barriers are no-ops): every rank writes its RNG file, the main one state.pt;
    only the main process reports; a vetoed checkpoint or an unsupported launch starts fresh."""
    folder, events = tmp_path / "ck", []

    def manager(rank: int) -> ResumeCheckpoints:
        return ResumeCheckpoints(
            folder,
            "fp",
            every=2,
            notify=lambda event, fields: events.append((rank, event)),
            processes=Processes(rank, 2, gather=lambda step: [step, step]),
        )

    generators = [torch.Generator().manual_seed(10 + rank) for rank in range(2)]
    for rank in (1, 0):  # the main process saves state.pt once every rank's RNG file is in place
        manager(rank).save(4, lambda: {"w": torch.ones(1), "extras": {"note": "x"}}, {"shuffle": generators[rank]})
    assert sorted(p.name for p in (folder / "step-4").iterdir()) == [
        "meta.json",
        "rng-rank0.pt",
        "rng-rank1.pt",
        "state.pt",
    ]
    expected = [torch.rand(2, generator=generator).tolist() for generator in generators]
    for rank in (0, 1):
        resumed, generator = manager(rank), torch.Generator()
        assert (
            resumed.open() == {"note": "x"} and resumed.resume()[0] == 4 and resumed.state is None
        )  # handed over once
        resumed.load_rng({"shuffle": generator})
        assert torch.rand(2, generator=generator).tolist() == expected[rank]
    assert events == [(0, "checkpoint"), (0, "resumed")]
    assert manager(0).open(validate=lambda extras: "a file it relies on is gone") is None and not folder.exists()
    assert events[-1] == (0, "checkpoint_discarded")
    unsupported = manager(0)
    assert (
        unsupported.open(unsupported="sharded state") is None
        and unsupported.every == 0
        and events[-1] == (0, "checkpoint_unsupported")
    )
    single = ResumeCheckpoints(
        tmp_path / "one", "fp", every=2, notify=lambda event, fields: None
    )  # SFT, reward: no RNG files
    single.save(2, {"rng": capture_rng()})
    assert sorted(p.name for p in (tmp_path / "one" / "step-2").iterdir()) == ["meta.json", "state.pt"]


# ---------------------------------------------------------------------------------------------------------- guards


def test_first_non_finite_names_the_first_bad_quantity() -> None:
    assert first_non_finite(loss=torch.tensor(0.5), logits=torch.zeros(2, 3), norm=1.0) is None
    logits = torch.zeros(2, 3)
    logits[1, 2] = float("inf")
    assert first_non_finite(loss=torch.tensor(0.5), logits=logits) == ("logits", float("inf"))
    name, value = first_non_finite(loss=torch.tensor(float("nan")), logits=logits)
    assert name == "loss" and value != value
    assert first_non_finite(grad_norm=float("-inf")) == ("grad_norm", float("-inf"))


def test_require_finite_raises_with_stage_step_quantity_and_hint() -> None:
    require_finite("sft", 3, "lower the learning rate", loss=torch.tensor(1.0))
    with pytest.raises(NonFiniteError) as caught:
        require_finite("sft", 3, "lower sft.learning_rate", loss=torch.tensor(float("nan")))
    message = str(caught.value)
    assert message.startswith("sft: non-finite loss (nan) at step 3") and "Hint: lower sft.learning_rate" in message
    assert (caught.value.stage, caught.value.step, caught.value.quantity) == ("sft", 3, "loss")

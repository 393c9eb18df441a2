"""The report kinds of the run contract: what each command writes carries its kind, what older interplab
wrote without one is still recognised (`runs.detect`), and an output folder holding another run is refused."""

import json

import pytest
import torch

from interplab import runs
from interplab.circuits.planted import induction_data, planted_induction
from interplab.data_attribution.record import GradientRecorder, RecordConfig
from interplab.runs import Kind, RunError

LEGACY = [  # (file name, document an older interplab wrote, the kind it is)
    ("config.json", {"command": "patch", "target": "z"}, Kind.PATCH),
    ("config.json", {"command": "heads", "batch": 8}, Kind.HEADS),
    ("config.json", {"command": "lens", "n": 16}, Kind.LENS),
    ("config.json", {"command": "scrub", "n_examples": 10}, Kind.SCRUB),
    ("config.json", {"command": "discover", "method": "eap"}, Kind.DISCOVERY),
    ("config.json", {"format": "interplab-gradients", "record": {}}, Kind.GRADIENTS),
    ("index.json", {"format": "interplab-gradients", "entries": []}, Kind.GRADIENT_INDEX),
    ("report.json", {"saes": [{"name": "s", "fvu": 0.2}]}, Kind.SAE_EVAL),
    ("report.json", {"target": "induction:1.0", "top": [], "window": [0, 10]}, Kind.ATTRIBUTION),
    ("report.json", {"experiment": "digits-split", "summary": {}}, Kind.ROUTING),
    ("report.json", {"experiment": "era", "rows": []}, Kind.ROUTING),
    ("report.json", {"kind": "scrub", "recovered": {}}, Kind.SCRUB),
    ("report.json", {"kind": "circuit", "edges": []}, Kind.CIRCUIT),
    ("config.json", {"command": "nope"}, None),
    ("report.json", {"experiment": "other"}, None),
]


@pytest.mark.parametrize("name,data,kind", LEGACY)
def test_documents_written_before_kind_are_recognised(tmp_path, name, data, kind):
    assert runs.detect_document(name, data) is kind
    (tmp_path / name).write_text(json.dumps(data))
    if name != runs.GRADIENT_INDEX:  # a folder is what its config.json or report.json says
        assert runs.detect(tmp_path) is kind


def test_reports_carry_their_kind_and_version(tmp_path):
    from interplab.circuits import DiscoveryTask, eap_circuit
    from interplab.scrub import ScrubConfig, scrub
    from interplab.scrub.induction import induction_steps, induction_task

    model = planted_induction()
    tokens, _, _ = induction_data(200, 16, 10, seed=0)
    task = induction_task(tokens)
    result = scrub(model, task, induction_steps()[-1], ScrubConfig(n_examples=50, n_seeds=1, per_claim=False))
    result.save(tmp_path / "scrub")
    assert runs.Report.open(tmp_path / "scrub", Kind.SCRUB).data["version"] == runs.VERSIONS[Kind.SCRUB]
    data = runs.read_json(tmp_path / "scrub" / runs.REPORT, strip=True)
    assert data.keys() == result.to_dict().keys() and data["n_examples"] == 50

    def metric(logits, rows):
        return -task.loss(logits, rows)

    dtask = DiscoveryTask(
        name="induction",
        tokens=task.tokens,
        clean=torch.arange(40),
        corrupt=torch.arange(40, 80),
        metric=metric,
    )
    circuit = eap_circuit(model, dtask, 5)
    circuit.save(tmp_path / "circuit")
    report = runs.Report.open(tmp_path / "circuit")
    assert report.kind is Kind.CIRCUIT and report.data["edges"] == list(circuit.edges)
    assert runs.detect(tmp_path / "circuit") is Kind.CIRCUIT


def test_gradient_recordings_carry_kinds_and_older_ones_resume(tmp_path):
    model = planted_induction()
    cfg = RecordConfig(group="head:1.0", dim=8)
    rec = GradientRecorder(tmp_path / "new", model, cfg)
    tokens, _, _ = induction_data(4, 16, 10, seed=0)
    assert rec.record(model, tokens, torch.arange(4), step=3, lr=0.1)
    assert runs.read_json(tmp_path / "new" / runs.CONFIG)["kind"] == "gradients"
    assert runs.read_json(tmp_path / "new" / runs.GRADIENT_INDEX)["kind"] == "gradient_index"
    assert runs.detect(tmp_path / "new") is Kind.GRADIENTS
    old = tmp_path / "old"  # the same recording as an older interplab wrote it ("format", no kind)
    old.mkdir()
    for name in (runs.CONFIG, runs.GRADIENT_INDEX):
        data = runs.read_json(tmp_path / "new" / name, strip=True)
        (old / name).write_text(json.dumps({"format": "interplab-gradients", **data}))
    (old / rec.index[0]["file"]).write_bytes((tmp_path / "new" / rec.index[0]["file"]).read_bytes())
    resumed = GradientRecorder(old, model)
    assert resumed.steps == [3] and resumed.cfg == cfg
    assert not resumed.record(model, tokens, torch.arange(4), step=3, lr=0.1)  # already recorded


def test_check_out_refuses_a_folder_of_another_kind(tmp_path):
    runs.write_json(tmp_path / "run" / runs.CONFIG, Kind.TRAIN, {"model": {}, "data": {}, "optim": {},
                                                                  "steps": 1, "batch_size": 1})  # fmt: skip
    with pytest.raises(RunError, match=r"is a training run .*writing a head-scores run there would replace"):
        runs.check_out(tmp_path / "run", Kind.HEADS)
    runs.write_json(tmp_path / "heads" / runs.CONFIG, Kind.HEADS, {})
    for ok in (tmp_path / "heads", tmp_path / "new", tmp_path):
        assert runs.check_out(ok, Kind.HEADS) == ok

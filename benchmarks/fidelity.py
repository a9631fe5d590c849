"""Storage vs fidelity on the demo teacher's val windows (V = 4,096), the settings and encodings of
benchmarks/storage.py: bytes/token of the target columns (v1's encoding, v2's, v2 with 8-bit log-probs), the KL
from the full teacher distribution to the stored top K (tail spread uniformly; no draws), and the cosine
between a student's *parameter* gradient from the stored target (decoded from v2, and from 8-bit log-probs)
and from the full distribution (positions that train only, documents masked as in training). Then, where the
demo trained them (report/summary.json), the students' val CE per cache and the selection experiment.

    python -m benchmarks.run --only fidelity     # after `make demo`
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from benchmarks import storage
from benchmarks.common import table
from pipeline.checkpoint import load_model
from pipeline.losses import LossConfig, row_losses
from pipeline.model import Gemma2
from pipeline.reader import ReaderConfig, ShardStream
from pipeline.topk import TopKConfig, teacher_targets
from schemas.tokens import document_ids


def _student_grad(student: Gemma2, ids: torch.Tensor, keep: torch.Tensor, targets: dict[str, torch.Tensor] | None,
                  full: torch.Tensor | None, cfg: LossConfig) -> torch.Tensor:
    student.zero_grad(set_to_none=True)
    inputs = ids[:, :-1]
    h = student.hidden_states(inputs, document_ids(inputs)).reshape(-1, student.config.hidden_size)[keep]
    z = student.logits(h)
    if full is not None:
        loss = -(full * torch.log_softmax(z, -1)).sum(-1).mean()
    else:
        loss = row_losses(z, {name: t[keep] for name, t in targets.items()}, cfg).mean()
    loss.backward()
    return torch.cat([p.grad.reshape(-1) for p in student.parameters()])


def run(teacher_dir: Path, val: Path, student_dir: Path | None, windows: int = 16,
        summary: Path | None = None) -> dict[str, Any]:
    teacher = load_model(teacher_dir, dtype=torch.float32)
    with ShardStream(val, ("input_ids", "label_mask"), ReaderConfig(windows, prefetch=0), shuffle=False) as stream:
        batch = stream.next_batch()
    ids, mask = torch.as_tensor(batch["input_ids"]).long(), torch.as_tensor(batch["label_mask"])
    keep = mask.reshape(-1)
    if student_dir is not None and (student_dir / "config.json").is_file():
        student = load_model(student_dir, dtype=torch.float32)
    else:
        from pipeline.model import preset

        student = Gemma2(preset("demo-student-s", vocab_size=teacher.config.vocab_size))
        student.init_weights(0)
    inputs = ids[:, :-1]
    with torch.no_grad():
        logits = teacher.logits(teacher.hidden_states(inputs, document_ids(inputs)).reshape(-1, teacher.config.hidden_size))
        logp_full = torch.log_softmax(logits.float(), -1)[keep]
    g_full = _student_grad(student, ids, keep, None, logp_full.exp(), LossConfig())
    positions = int(keep.sum())
    rows = []
    for k, n, sampling in storage.setting_keys():
        tt = teacher_targets(teacher, ids, list(range(windows)), TopKConfig(topk=k, samples=n, sampling=sampling)
                             if n else TopKConfig(topk=k), mask)
        sizes = {name: storage.measure_bytes(tt, k, n, enc, repeats=1)
                 for name, enc in (("v1", storage.V1), ("v2", storage.V2), ("q8", storage.V2_Q8))}
        row: dict[str, Any] = {"K": k, "N": n, "sampling": sampling if n else "-",
                               **{f"{name}_B": s["bytes"] for name, s in sizes.items()}}
        cos = {}
        for name, enc in (("v2", storage.V2), ("q8", storage.V2_Q8)):
            target = storage.decoded(tt, k, n, enc)
            g = _student_grad(student, ids, keep, target, None, LossConfig(target="sampled" if n else "tail"))
            cos[name] = torch.nn.functional.cosine_similarity(g, g_full, dim=0).item()
            if n == 0 and name == "v2":
                g_renorm = _student_grad(student, ids, keep, target, None, LossConfig(target="renorm"))
                row["cos_renorm"] = torch.nn.functional.cosine_similarity(g_renorm, g_full, dim=0).item()
        row.setdefault("cos_renorm", None)
        row.update(KL_full=_kl(logp_full, tt, keep, k) if n == 0 else None, cos_v2=cos["v2"], cos_q8=cos["q8"])
        rows.append(row)
    print(table(f"Storage vs fidelity on the demo teacher ({positions} trained val positions, V = "
                f"{teacher.config.vocab_size:,}; bytes of the target columns per token; cosine of the student's "
                "parameter gradient with the full-distribution gradient: tail bucket without draws, sampled with)",
                rows))
    students = students_summary(summary) if summary is not None else {}
    return {"rows": rows, "students": students}


def _kl(logp_full: torch.Tensor, tt: Any, keep: torch.Tensor, k: int) -> float:
    ids = torch.from_numpy(tt.topk_ids.reshape(-1, k)).long()[keep]
    tail = torch.from_numpy(tt.tail_mass.reshape(-1)).double()[keep]
    p = logp_full.exp().double()
    recon = (tail / (p.shape[1] - k))[:, None].expand(p.shape).clone()
    recon.scatter_(1, ids, p.gather(1, ids))
    return float((p * (logp_full.double() - recon.clamp_min(1e-300).log())).sum(-1).mean())


def students_summary(summary: Path) -> dict[str, Any]:
    """The demo's students trained from each cache and with the data selection, from the report's summary."""
    if not summary.is_file():
        print(f"\nStudents: no {summary}; run `make demo` for the students' val CE per cache")
        return {}
    raw = json.loads(summary.read_text())
    models = {m["name"]: m for m in raw["models"]}
    rows = [{"student": name, "cache": m.get("cache", "-"), "select": m.get("select") or "-",
             "target_B": m.get("target_bytes_per_token"), "val_ce": m["val_ce"], "val_ppl": m["val_ppl"],
             "kl_to_teacher": m.get("kl_to_teacher")}
            for name, m in models.items() if m["loss_mode"] == "kd" and name.startswith("s-kd")
            and "cont" not in name]
    print(table("Demo students from each cache (report/summary.json; KL on the main cache's val split)", rows))
    for line in raw.get("findings", []):
        print(f"  {line}")
    return {"rows": rows, "findings": raw.get("findings", [])}


if __name__ == "__main__":
    import sys

    work = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("runs/demo")
    run(work / "teacher", work / "logits" / "val", work / "students" / "s-kd", summary=work / "report" / "summary.json")

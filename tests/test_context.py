"""Issue 15's context candidates: prototypical emotion distributions M, the EMA teacher, DAN's affinity loss and
the logit-adjusted cross-entropy, each against an independent computation, and a run that uses them."""
import json

import cv2
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import TINY, ern

FAST = [*TINY, "--tsne_samples=0", "--attention_samples=0"]


def test_kl_against_a_target_distribution_is_kl_div_of_the_prediction():
    """With r given, the KL term is KL(r || softmax(z)), whatever the context logits; without, it is still KL(t || q)."""
    gen = torch.Generator().manual_seed(0)
    logits, context = torch.randn(6, 5, generator=gen), torch.randn(6, 5, generator=gen)
    t = ern.smooth_targets(torch.tensor([0, 1, 2, 3, 4, 0]), 5, 0.1)
    r = torch.rand(6, 5, generator=gen).softmax(1)
    want = F.kl_div(logits.log_softmax(1), r, reduction="batchmean").item()
    for context_logits in (context, None):
        total, ce, kl = ern.hybrid_loss(logits, context_logits, t, 0.5, r=r)
        assert kl.item() == pytest.approx(want, rel=1e-5)
        assert total.item() == pytest.approx(ce.item() + 0.5 * want, rel=1e-5)
    _, _, kl_label = ern.hybrid_loss(logits, context, t, 0.5)
    assert kl_label.item() == pytest.approx(F.kl_div(context.log_softmax(1), t, reduction="batchmean").item(), rel=1e-5)


def test_logit_adjusted_cross_entropy_is_torchs_on_shifted_logits():
    """Menon et al.'s loss: cross-entropy of z + tau log(prior); the prior from the training labels' counts."""
    gen = torch.Generator().manual_seed(1)
    train_y = torch.tensor([0] * 6 + [1] * 3 + [2] * 1)
    cfg = ern.Config(logit_adjustment=1.5, context=False)
    offset = ern.loss_parts(None, cfg, train_y, 3)["logit_offset"]
    np.testing.assert_allclose(offset.numpy(), 1.5 * np.log([0.6, 0.3, 0.1]), rtol=1e-6)
    logits, y = torch.randn(8, 3, generator=gen), torch.tensor([0, 1, 2, 2, 1, 0, 2, 1])
    _, ce, _ = ern.hybrid_loss(logits, None, ern.smooth_targets(y, 3, 0.1), 0.5, logit_offset=offset)
    want = F.cross_entropy(logits + torch.tensor(1.5 * np.log([0.6, 0.3, 0.1]), dtype=torch.float32), y, label_smoothing=0.1)
    assert ce.item() == pytest.approx(want.item(), rel=1e-5)


def test_class_distributions_keep_reliable_rows_and_the_target_falls_back_to_t():
    sums = torch.tensor([[30.0, 10.0, 0.0], [1.0, 2.0, 0.0], [0.0, 0.0, 0.0]])
    counts = torch.tensor([40.0, 3.0, 0.0])
    m = ern.class_distributions(sums, counts)
    torch.testing.assert_close(m, torch.tensor([[0.75, 0.25, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))  # 3 < 20 faces
    y = torch.tensor([0, 1, 2, 0])
    t = ern.smooth_targets(y, 3, 0.3)
    r = ern.distribution_target(m, y, t)
    torch.testing.assert_close(r, torch.stack([m[0], t[1], t[2], m[0]]))


def test_affinity_loss_is_dans_on_the_unit_sphere():
    gen = torch.Generator().manual_seed(2)
    f, p, y = torch.randn(10, 4, generator=gen), torch.randn(3, 4, generator=gen), torch.arange(10) % 3
    fn = f.numpy() / np.linalg.norm(f.numpy(), axis=1, keepdims=True)
    pn = p.numpy() / np.linalg.norm(p.numpy(), axis=1, keepdims=True)
    pull = np.mean([np.sum((fn[i] - pn[y[i]]) ** 2) for i in range(10)])
    spread = np.mean([np.sum((pn[k] - pn.mean(0)) ** 2) for k in range(3)])  # the centres' variance
    assert ern.affinity_loss(f, p, y).item() == pytest.approx(pull / spread, rel=1e-4)
    assert ern.affinity_loss(3 * f, 0.1 * p, y).item() == pytest.approx(pull / spread, rel=1e-4)  # directions only
    p.requires_grad_(True)  # a step on the prototypes alone spreads them apart
    ern.affinity_loss(f, p, y).backward()
    q = (p - 0.05 * p.grad).detach()

    def spread(c):
        return F.normalize(c, dim=1).var(0, unbiased=False).sum().item()

    assert spread(q) > spread(p.detach())


class Recorder(nn.Module):
    """A network that keeps what it was given and what it returned."""

    def __init__(self, net):
        super().__init__()
        self.net, self.inputs, self.logits = net, [], []

    def forward(self, x):
        out = self.net(x)
        self.inputs.append(x.detach().clone())
        self.logits.append(out[0].detach().float().clone())
        return out


def epoch_parts(cfg, n=64, k=4):
    torch.manual_seed(0)
    model = ern.build_model(cfg, k)
    optimizer = ern.make_optimizer(model, cfg)
    scheduler = ern.make_scheduler(optimizer, cfg, n // cfg.batch_size)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    labels = torch.arange(n) % k
    return model, optimizer, scheduler, scaler, images, labels


def test_an_epoch_leaves_m_as_the_mean_prediction_of_its_correct_faces(monkeypatch):
    """Oracle: the logits the network returned, paired with the labels of the epoch's permutation; the KL term
    used the previous M's reliable row and t elsewhere."""
    monkeypatch.setattr(ern, "DISTRIBUTION_MIN_FACES", 2)
    cfg = ern.Config(batch_size=8, width=0.25, blocks="1,1,1,1", context_target="distribution", lr=3e-3,
                     channels_last=False, epochs=1)
    model, optimizer, scheduler, scaler, images, labels = epoch_parts(cfg)
    m = model.context.distributions
    m[1] = torch.tensor([0.1, 0.7, 0.1, 0.1])  # a reliable row from "the previous epoch"
    before = m.clone()
    net = Recorder(model)
    stats = ern.train_one_epoch(net, images, labels, torch.full((3,), 0.5), torch.full((3,), 0.25), optimizer, scheduler,
                        scaler, cfg, 7, num_classes=4, distributions=m)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + 7))
    y = labels[perm]
    logits = torch.cat(net.logits)
    right = logits.argmax(1) == y
    assert 4 <= right.sum() < 64
    want = torch.zeros(4, 4)
    for c in range(4):
        mine = right & (y == c)
        if mine.sum() >= 2:
            want[c] = logits[mine].softmax(1).mean(0)
    torch.testing.assert_close(m, want, rtol=1e-5, atol=1e-6)
    assert (m.sum(1) > 0).any()
    t = ern.smooth_targets(y, 4, cfg.label_smoothing)
    r = torch.where((y == 1)[:, None], before[1], t)
    kl = [F.kl_div(z.log_softmax(1), r[i * 8:(i + 1) * 8], reduction="batchmean") for i, z in enumerate(net.logits)]
    assert stats["train_kl"] == pytest.approx(torch.stack(kl).mean().item(), rel=1e-4)


def test_the_teacher_sees_the_students_faces_and_is_its_kl_target():
    cfg = ern.Config(batch_size=8, width=0.25, blocks="1,1,1,1", context_target="teacher", ema_decay=0.9,
                     channels_last=False, epochs=1, context_weight=1.0)
    model, optimizer, scheduler, scaler, images, labels = epoch_parts(cfg, n=32)
    ema = ern.EMA(model, cfg.ema_decay)
    ema.model = Recorder(ema.model)
    student = Recorder(model)
    stats = ern.train_one_epoch(student, images, labels, torch.full((3,), 0.5), torch.full((3,), 0.25), optimizer,
                                scheduler, scaler, cfg, 1, num_classes=4, ema=ema)
    assert len(ema.model.inputs) == len(student.inputs) == 4
    for a, b in zip(ema.model.inputs, student.inputs):
        assert torch.equal(a, b)  # the same augmented faces
    kl = [F.kl_div(s.log_softmax(1), (t / ern.TEACHER_TEMPERATURE).softmax(1), reduction="batchmean")
          for s, t in zip(student.logits, ema.model.logits)]
    assert stats["train_kl"] == pytest.approx(torch.stack(kl).mean().item(), rel=1e-4)


@pytest.mark.parametrize("args, message", [
    (["--context_target=teacher"], "needs --ema_decay"),
    (["--context_target=teacher", "--ema_decay=0.99", "--context_weight=0"], "needs --context_weight > 0"),
    (["--context_target=distribution", "--mixup=0.2"], "cannot be mixed with --mixup"),
    (["--context_target=distribution", "--context=false"], "needs --context=true"),
    (["--affinity_weight=0.1", "--context=false"], "needs --context=true"),
    (["--context_target=prototypes"], "must be label or distribution or teacher"),
    (["--logit_adjustment=-1"], "must be >= 0"),
])
def test_context_settings_that_cannot_work_are_refused(args, message):
    with pytest.raises(ern.UserError, match=message):
        ern.validate_config(ern.parse_args(args)[0])


def test_a_run_with_m_affinity_and_logit_adjustment_saves_m_plots_it_and_evaluates(tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(ern, "DISTRIBUTION_MIN_FACES", 1)
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    ern.main([*FAST, f"--data_dir={tiny_dataset}", "--epochs=2", f"--output_dir={run}", "--context_target=distribution",
              "--affinity_weight=0.1", "--logit_adjustment=1", "--ema_decay=0.9"])
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(h["train_affinity"] > 0 for h in history)
    with pytest.raises(ern.UserError, match="--resume cannot change --context_target"):
        ern.main([f"--resume={run / 'last.pth'}", "--context_target=label"])
    best = torch.load(run / "best_emotion_model.pth", weights_only=True)
    last = torch.load(run / "last.pth", weights_only=True)
    m = last["model"]["context.distributions"]
    reliable = m.sum(1) > 0
    assert reliable.any()
    torch.testing.assert_close(m[reliable].sum(1), torch.ones(int(reliable.sum())))
    torch.testing.assert_close(last["ema"]["context.distributions"], m)  # M itself, not an average of it
    assert "context.distributions" in best["model"]
    wide = cv2.imread(str(run / "context_similarities.png")).shape[1]
    assert wide > 2000  # three panels (two are 1650 pixels wide)
    ern.main([f"--evaluate={run / 'best_emotion_model.pth'}", f"--data_dir={tiny_dataset}",
              f"--output_dir={tmp_path / 'eval'}", "--tsne_samples=0", "--attention_samples=0"])
    saved = json.loads((run / "evaluation_results.json").read_text())
    again = json.loads((tmp_path / "eval" / "evaluation_results.json").read_text())
    assert again["confusion_matrix"] == saved["confusion_matrix"]

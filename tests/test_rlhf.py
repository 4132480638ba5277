"""Chapter 5's task module: prompts, sampling, the KL leash of each method, the losses,
best-of-N, and a fine-tuning loop that learns what a judge rewards."""

from __future__ import annotations

import math

import pytest
import torch

from lmpg_utils import rlhf
from lmpg_utils.tokenization import WordVocab
from lmpg_utils.transformer import GPT, TransformerConfig

VOCAB = WordVocab.build(["alpha beta gamma delta epsilon zeta eta theta"])
TASK = rlhf.Task(prompt_words=2, max_new_tokens=5)
TARGET_WORD = VOCAB.stoi["gamma"]


class CountingJudge:
    """A stand-in reward model: the target group's probability grows with the number of
    times the word ``gamma`` appears (a sigmoid of count - 1)."""

    def log_probs(self, texts):
        counts = torch.tensor([float(t.split().count("gamma")) for t in texts])
        target = torch.sigmoid(2.0 * (counts - 1.0))
        rest = (1 - target)[:, None].expand(-1, 3) / 3
        columns = [rest[:, 0], rest[:, 1], rest[:, 2]]
        columns.insert(TASK.target, target)
        return torch.stack(columns, dim=1).clamp_min(1e-6).log()


def tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    config = TransformerConfig(vocab_size=len(VOCAB), d_model=16, num_heads=2,
                               num_layers=1, d_ff=32, max_len=16, dropout=0.0)  # fmt: skip
    return GPT(config).eval()


def prompts(count: int = 3) -> torch.Tensor:
    words = [VOCAB.stoi[w] for w in ("alpha", "beta", "delta", "zeta")]
    return torch.tensor([[VOCAB.bos_id, words[i % 4], words[(i + 1) % 4]]
                         for i in range(count)])  # fmt: skip


def test_task_names_what_is_wrong():
    with pytest.raises(ValueError, match="target_group"):
        rlhf.Task(target_group="apocrypha")
    with pytest.raises(ValueError, match="differ"):
        rlhf.Task(source_group="prophets", target_group="prophets")
    with pytest.raises(ValueError, match="prompt_words"):
        rlhf.Task(prompt_words=0)
    assert rlhf.Task().target == 1 and rlhf.Task().source == 0


def test_samples_are_laid_out_by_prompt_and_render_whole_verses():
    drawn = rlhf.sample(tiny_gpt(), prompts(), 2, TASK, VOCAB, torch.Generator())
    assert drawn.tokens.shape[0] == 6 and drawn.k == 2
    assert torch.equal(drawn.prompts[::2], prompts()) and torch.equal(
        drawn.prompts[1::2], prompts()
    )
    for row, text in enumerate(drawn.texts):
        words = text.split()
        assert words[:2] == [VOCAB.itos[int(i)] for i in drawn.prompts[row, 1:]]
        assert not {"<s>", "</s>", "<pad>"} & set(words)
        assert len(words) == 2 + int(drawn.lengths[row]) - int(
            (drawn.tokens[row] == VOCAB.eos_id).any()
        )


@pytest.mark.parametrize("name", list(rlhf.METHODS))
def test_each_method_puts_the_kl_leash_where_it_belongs(name):
    gpt = tiny_gpt()
    reference = tiny_gpt(seed=1)
    leash = rlhf.Leash(rlhf.METHODS[name], beta=0.3, k=3)
    policy = rlhf.Policy(gpt, leash.method.value_head)
    roll = rlhf.rollout(policy, reference, prompts(), leash, TASK, VOCAB,
                        CountingJudge(), torch.Generator().manual_seed(0))  # fmt: skip
    kl = (roll.log_probs - roll.ref_log_probs).sum(dim=1)
    score = CountingJudge().log_probs(roll.hypotheses)[:, TASK.target]
    assert torch.allclose(roll.stats["kl"] * torch.ones(()), kl.mean(), atol=1e-5)
    if leash.method.kl == "loss":
        assert torch.allclose(roll.rewards.reshape(-1), score)
    else:
        assert torch.allclose(roll.rewards.reshape(-1), score - 0.3 * kl, atol=1e-5)
    if leash.method.kl == "token-reward":
        assert torch.allclose(
            roll.token_rewards.sum(dim=1), score - 0.3 * kl, atol=1e-5
        )
        assert roll.values is not None and roll.values.shape == roll.mask.shape
    # the loss is finite, differentiable, and its policy log-probabilities are the
    # ones the samples were drawn with
    log_probs, _ = policy.outputs(rlhf._samples_of(roll, 3), VOCAB)
    assert torch.allclose(log_probs, roll.log_probs, atol=1e-5)
    from lmpg_utils.policy_gradient import ESTIMATORS

    advantages = ESTIMATORS[leash.method.estimator].rollout_advantages(roll)
    total, stats = rlhf.loss(policy, roll, advantages, leash, TASK, VOCAB)
    total.backward()
    assert torch.isfinite(total) and "policy_loss" in stats
    assert ("k3" in stats) == (leash.method.kl == "loss")
    assert ("value_loss" in stats) == leash.method.value_head
    grads = [p.grad for p in policy.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_a_method_needs_the_samples_its_baseline_uses():
    with pytest.raises(ValueError, match="k >= 2"):
        rlhf.Leash(rlhf.METHODS["rloo"], beta=0.1, k=1)
    with pytest.raises(ValueError, match="beta"):
        rlhf.Leash(rlhf.METHODS["grpo"], beta=-1.0, k=4)


def test_best_of_n_keeps_what_the_proxy_likes_best_at_its_known_kl():
    assert rlhf.best_of_n_kl(1) == 0.0
    assert math.isclose(rlhf.best_of_n_kl(4), math.log(4) - 0.75)
    judge = CountingJudge()
    one = rlhf.best_of_n(tiny_gpt(), prompts(8), 1, TASK, VOCAB, judge, judge, seed=0)
    many = rlhf.best_of_n(tiny_gpt(), prompts(8), 8, TASK, VOCAB, judge, judge, seed=0)
    assert many.proxy > one.proxy and many.kl == pytest.approx(rlhf.best_of_n_kl(8))


def test_fine_tuning_learns_what_the_judge_rewards():
    """RLOO on a tiny GPT: the held-out reward rises well above its start, and the KL
    to the frozen reference grows from zero. (Seeds 0, 1 and 2 all end 16 standard
    errors above the start, at a KL of about 10.5 nats.)"""
    reference = tiny_gpt()
    judge = CountingJudge()
    train, held_out = prompts(16), prompts(8)
    tuned = rlhf.fine_tune(reference, rlhf.Leash(rlhf.METHODS["rloo"], 0.0, 4), TASK,
                           VOCAB, judge, judge, train, held_out, steps=40,
                           prompts_per_update=8, lr=3e-2, eval_every=40,
                           eval_samples=8, seed=0, eval_seed=1)  # fmt: skip
    start, end = tuned.evaluations[0], tuned.final
    assert start.kl == pytest.approx(0.0, abs=1e-6)
    assert end.proxy > start.proxy + 5 * max(start.proxy_se, end.proxy_se)
    assert end.kl > 0.1
    assert not any(p.requires_grad for p in reference.parameters())
    times = tuned.history.times  # where the seconds went: all three parts are counted
    assert times.samples == 40 * 8 * 4
    assert min(times.sampling, times.reward, times.backward) > 0


def test_a_second_run_from_the_same_frozen_reference_still_trains():
    reference, judge = tiny_gpt(), CountingJudge()
    for _ in range(2):
        tuned = rlhf.fine_tune(reference, rlhf.Leash(rlhf.METHODS["grpo"], 0.1, 2), TASK,
                               VOCAB, judge, judge, prompts(4), prompts(2), steps=1,
                               prompts_per_update=2, lr=1e-2, eval_every=1,
                               eval_samples=1, seed=0, eval_seed=1)  # fmt: skip
        assert all(p.requires_grad for p in tuned.policy.parameters())


def test_a_baseline_makes_the_first_gradient_less_noisy():
    """At the reference, with rewards all below zero, plain REINFORCE's gradient is
    mostly noise; a group baseline removes much of it. (Noise per unit of signal for
    seeds 0, 1, 2: none 7.1, 7.5, 8.8; RLOO 1.4, 1.8, 1.7; GRPO 1.1, 1.5, 1.6.)"""
    noise = rlhf.gradient_noise(tiny_gpt(), prompts(4), ["none", "rloo", "grpo",
                                "dr-grpo"], 4, TASK, VOCAB, CountingJudge(), draws=12,
                                seed=0)  # fmt: skip
    assert all(math.isfinite(v) and v > 0 for v in noise.values())
    assert noise["rloo"] < noise["none"] and noise["grpo"] < noise["none"]
    # RLOO's advantage is K/(K-1) times Dr. GRPO's: the same direction, the same noise
    assert noise["rloo"] == pytest.approx(noise["dr-grpo"], rel=1e-6)
    with pytest.raises(ValueError, match="history"):
        rlhf.gradient_noise(tiny_gpt(), prompts(4), ["reinforce"], 4, TASK, VOCAB,
                            CountingJudge(), draws=2, seed=0)  # fmt: skip


def test_the_sft_control_trains_a_frozen_copy_towards_its_verses():
    from lmpg_utils.language_modeling import lm_loss

    policy = tiny_gpt().requires_grad_(False)  # as a deepcopy of fine_tune's reference
    verses = [[TARGET_WORD] * 4, [TARGET_WORD, VOCAB.stoi["beta"], TARGET_WORD]] * 4
    batch = torch.tensor([[VOCAB.bos_id, *[TARGET_WORD] * 4, VOCAB.eos_id]])
    before = float(lm_loss(policy, batch, VOCAB.pad_id)[0])
    history = rlhf.supervised_control(policy.train(), verses, VOCAB, seconds=60.0,
                                      lr=1e-2, batch_size=4, seed=0, max_steps=30)  # fmt: skip
    after = float(lm_loss(policy.eval(), batch, VOCAB.pad_id)[0])
    assert len(history.losses) == 30 and after < 0.5 * before
    with pytest.raises(ValueError, match="seconds"):
        rlhf.supervised_control(policy, verses, VOCAB, 0.0, 1e-2, 4, 0)


def test_reward_at_kl_interpolates_along_the_furthest_reach():
    def point(kl, gold):
        return rlhf.Evaluation(proxy=-gold, proxy_se=0, gold=gold, gold_se=0,
                               gold_target_share=0, kl=kl, kl_se=0, distinct_2=0,
                               reference_perplexity=1, mean_length=1)  # fmt: skip

    # the KL dips at the third evaluation: the path's reach stays at 4 there
    path = [point(0.0, -4.0), point(2.0, -3.0), point(1.5, -2.5), point(4.0, -1.0)]
    assert rlhf.reward_at_kl(path, 1.0, "gold") == pytest.approx(-3.5)
    assert rlhf.reward_at_kl(path, 3.0, "gold") == pytest.approx(-1.75)
    assert rlhf.reward_at_kl(path, 1.0, "proxy") == pytest.approx(3.5)
    assert rlhf.reward_at_kl(path, 0.0, "gold") == -4.0
    assert math.isnan(rlhf.reward_at_kl(path, 4.5, "gold"))
    with pytest.raises(ValueError, match="judge"):
        rlhf.reward_at_kl(path, 1.0, "kl")

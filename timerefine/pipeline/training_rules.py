"""Rules on a composed config as a whole: why it may not train (checked where a run trains, not where a
saved run loads, so one trained before a rule still evaluates), and which of its keys nothing reads."""

from __future__ import annotations

from omegaconf import DictConfig


def half_weights_trained(cfg: DictConfig) -> str | None:
    """Why a run would train its LM's weights in half precision (``model.lm.dtype`` without LoRA, with
    steps to train: ``max_steps=0`` evaluates a model as it is); None when it would not. Checked where
    a run trains, not where a saved run loads: one trained so before this rule still evaluates."""
    lm, lora = cfg.model.lm, cfg.model.lora
    if lm.dtype == "float32" or lora.enabled or cfg.trainer.max_steps == 0:
        return None
    lora_instead = (
        ""
        if lm.weights == "random"
        else f"model.lora.enabled=true (frozen weights in {lm.dtype}, adapters in float32) or "
    )
    return (
        f"model.lm.dtype={lm.dtype} with model.lora.enabled=false: without LoRA the whole LM trains, "
        f"and its weights in {lm.dtype} lose AdamW's small updates to rounding; set "
        f"{lora_instead}model.lm.dtype=float32 with trainer.precision=bf16-mixed"
    )


LOWER_IS_BETTER, HIGHER_IS_BETTER = ("loss", "parse_fail"), ("mIoU", "R1@")  # in the metrics' names


def wrong_way_monitor(cfg: DictConfig) -> str | None:
    """Why a run would keep (or stop at) its worst checkpoint: a monitored metric whose better values
    are known (:data:`LOWER_IS_BETTER`, :data:`HIGHER_IS_BETTER`) with the other ``mode``; None when
    none is."""
    stopping = cfg.callbacks.early_stopping or {}
    for key, node in (
        ("callbacks.checkpoint", cfg.callbacks.checkpoint),
        ("callbacks.early_stopping", stopping),
    ):
        monitor, mode = node.get("monitor"), node.get("mode")
        name = (monitor or "").rpartition("/")[2]
        lower, higher = (any(part in name for part in parts) for parts in (LOWER_IS_BETTER, HIGHER_IS_BETTER))
        better = "min" if lower else "max" if higher else mode
        if better != mode:
            return (
                f"{key}.monitor={monitor} with {key}.mode={mode}: a {'lower' if better == 'min' else 'higher'} "
                f"{name} is better, so the run would keep its worst; set {key}.mode={better}"
            )
    return None


def idle_projector_steps(cfg: DictConfig) -> str | None:
    """Why ``saliency.projector_steps`` would train only the saliency head, which serves the projector."""
    if cfg.model.saliency.projector_steps and not cfg.model.trainable.projector:
        steps = f"model.saliency.projector_steps={cfg.model.saliency.projector_steps}"
        return f"{steps} train the projector, which model.trainable.projector=false freezes: set it to 0"
    return None


def uncounted_accumulation(cfg: DictConfig) -> str | None:
    """Why ``+trainer.accumulate_grad_batches`` is no count of batches (``2.0`` made validation's
    interval a share of an epoch, so a run never validated)."""
    batches = cfg.trainer.get("accumulate_grad_batches", 1)
    if type(batches) is int and batches >= 1:
        return None
    return f"trainer.accumulate_grad_batches={batches}: a whole number of batches, at least 1"


def no_grpo_signal(cfg: DictConfig) -> str | None:
    """Why every GRPO group of ``cfg`` would have equal rewards, so no advantage but 0; None otherwise."""
    grpo, same = cfg.grpo, "so every answer of a group gets the same reward and no advantage is other than 0"
    if grpo.enabled and grpo.temperature == 0:
        return f"grpo.temperature=0 samples greedily: a group's answers are one answer, {same}"
    if grpo.enabled and set(grpo.reward) == {"format"} and grpo.constrained:
        return f"grpo.reward=[format] with grpo.constrained=true: every constrained answer parses, {same}"
    return None


def grpo_under_fsdp(cfg: DictConfig) -> str | None:
    """Why a GRPO run cannot train under FSDP: it samples and steps inside Lightning's training step, which
    FSDP runs in its root unit's forward, and a backward there breaks FSDP's state (its assertion)."""
    strategy = cfg.trainer.strategy
    name = str(strategy.get("name") if isinstance(strategy, DictConfig) else strategy)
    if cfg.grpo.enabled and name.startswith("fsdp"):
        return (
            "grpo.enabled=true cannot train under FSDP (trainer.strategy): it steps by hand inside the "
            "training step, which FSDP runs in its root unit's forward; use trainer=ddp"
        )
    return None


def training_refusal(cfg: DictConfig) -> str | None:
    """Why ``cfg`` may not train, by the rules checked where a run trains, not where a saved run loads
    (one trained so before a rule still evaluates); None when it may."""
    rules = (
        half_weights_trained,
        wrong_way_monitor,
        idle_projector_steps,
        uncounted_accumulation,
        no_grpo_signal,
        grpo_under_fsdp,
    )
    return next((refused for rule in rules if (refused := rule(cfg))), None)


def unread_settings(cfg: DictConfig) -> dict[str, str]:
    """Each key that nothing reads, the other settings being as they are, and why."""
    model, unread = cfg.model, {}
    if not model.lora.enabled:
        off = "LoRA is off (model.lora.enabled=false)"
        unread |= {f"model.lora.{key}": off for key in model.lora if key not in ("enabled", "inherited")}
    if not cfg.init_from_run:
        unread["model.lora.inherited"] = "no init_from_run"
    if model.lm.name_or_path:
        sized = "a pretrained LM (model.lm.name_or_path) has its own size"
        unread |= {f"model.lm.tiny.{key}": sized for key in model.lm.tiny}
    if model.lm.name_or_path or model.lm.tokenizer:
        unread["model.lm.tokenizer_vocab_size"] = (
            "it sizes the BPE trained on the data, made only without model.lm.name_or_path and model.lm.tokenizer"
        )
    if model.lm.grounding_tokens == "reference":
        unread["model.lm.video_whitespace"] = "model.lm.grounding_tokens=reference has no <video> token"
    if not model.refine.steps:
        direct = "a direct answer (model.refine.steps=0) has no <OFFSET>"
        unread |= {f"model.aux.{key}": direct for key in model.aux}
        unread |= {f"model.refine.on_policy.{key}": direct for key in model.refine.on_policy}
    if not cfg.grpo.enabled:
        unread |= {f"grpo.{key}": "GRPO is off (grpo.enabled=false)" for key in cfg.grpo if key != "enabled"}
        return unread
    sampled = "GRPO trains on its own samples, not on on-policy targets"
    unread |= {
        f"model.refine.on_policy.{key}": sampled for key in model.refine.on_policy if model.refine.steps
    }
    if "refine_gain" not in cfg.grpo.reward:
        unread["grpo.refine_bonus"] = "only the refine_gain reward (grpo.reward) reads it"
    if cfg.grpo.num_iterations == 1:
        unread["grpo.epsilon"] = (
            "the ratio of a rollout's one step (grpo.num_iterations=1) is 1, never clipped"
        )
    if "gradient_clip_algorithm" in cfg.trainer:
        unread["trainer.gradient_clip_algorithm"] = "GRPO clips the gradient norm (trainer.gradient_clip_val)"
    return unread

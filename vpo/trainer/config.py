"""``VPOConfig``: ``transformers.TrainingArguments`` plus the model, data, reference and method hyper-parameters.

Every field is a plain dataclass field, so ``transformers.HfArgumentParser`` reads the whole configuration from a YAML
file (``vpo train --config FILE.yaml``) or from ``--flag value`` pairs, and the Trainer's own arguments (``output_dir``,
``learning_rate``, ``max_steps``, ``bf16``, ``gradient_checkpointing``, ``report_to``, ``save_steps``, ``seed``,
``data_seed`` ...) sit beside vpo's. The defaults are the papers' (``docs/methods.md``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from transformers import TrainingArguments

from vpo.trainer.trl_options import check_trl_options, refuse_trl_fields

METHODS = ("dpo", "tpo", "catpo", "ovip", "lpoi", "mdpo", "csr")
REF_MODES = ("auto", "adapter", "model", "precomputed")
FAMILIES = ("llava", "qwen2_vl", "qwen2_5_vl", "idefics2", "generic")
# TRL's DPO loss variants (on per-sequence log-probs; vpo.losses / the fused losses' loss_type), TRL's order.
LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
TPO_REWARDS = ("both", "only_win", "only_loss", "opposite")
OVIP_IMAGE_LOSSES = ("ovip", "base", "symmetric")
OVIP_ANCHORS = ("none", "anchor", "bi-anchor")
LORA_SCOPES = ("language_model", "all")
CATPO_WEIGHT_SOURCES = ("reference", "batch")
LOSS_IMPLS = ("auto", "torch", "triton")
DTYPES = ("auto", "float32", "bfloat16", "float16")
ONLINE_JUDGES = ("shapes", "http")
ONLINE_NEGATIVES = ("shapes", "diffusers")


def _choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


@dataclass
class VPOConfig(TrainingArguments):
    """Training arguments for :class:`vpo.trainer.VPOTrainer` (see the module docstring).

    Example (YAML, read by ``vpo train --config``)::

        method: dpo
        model_name_or_path: tiny:llava
        data_path: synthetic:32
        output_dir: runs/tiny-dpo
        max_steps: 10
        per_device_train_batch_size: 2
        learning_rate: 1.0e-3
    """

    # TrainingArguments fields with TRL's DPOConfig default (docs/trl.md: the defaults table)
    logging_steps: float = field(default=10, metadata={"help": "log every N optimizer steps (TRL's default 10)"})

    # --- method -------------------------------------------------------------------------------------------------
    method: str = field(default="dpo", metadata={"help": f"preference method, one of {list(METHODS)}"})
    beta: float = field(default=0.1, metadata={"help": "β of the DPO-style terms (every method)"})
    label_smoothing: float = field(default=0.0, metadata={
        "help": "ε in [0, 0.5) of the DPO term: conservative DPO (sigmoid, aot, aot_unpaired), rDPO's flip rate "
                "(robust), EXO's ε (exo_pair); the other loss types ignore it, with a warning"})
    loss_impl: str = field(default="auto", metadata={"help": "kernel choice of the fused losses: auto|torch|triton"})
    loss_type: str = field(default="sigmoid", metadata={
        "help": f"DPO-family loss variant(s) of the preference term, one of {list(LOSS_TYPES)} or several "
                "comma-separated (e.g. sigmoid,sft), summed with loss_weights (docs/methods.md)"})
    loss_weights: Optional[str] = field(default=None, metadata={
        "help": "comma-separated weights of the loss_type terms (default: 1 each)"})
    # TRL's DPOConfig options (same names, defaults and meaning; docs/trl.md)
    f_divergence_type: str = field(default="reverse_kl", metadata={
        "help": f"f-DPO divergence of the DPO term, one of {list(F_DIVERGENCES)}"})
    f_alpha_divergence_coef: float = field(default=0.5, metadata={"help": "α of f_divergence_type alpha_divergence"})
    discopop_tau: float = field(default=0.05, metadata={"help": "τ of loss_type discopop"})
    use_weighting: bool = field(default=False, metadata={
        "help": "WPO: weight each pair by its responses' probability under the policy (dpo, csr and the DPO term "
                "of ovip, lpoi, mdpo; docs/trl.md)"})
    ld_alpha: Optional[float] = field(default=None, metadata={
        "help": "LD-DPO α in [0, 1]: response tokens beyond the pair's shorter length count α times"})
    sync_ref_model: bool = field(default=False, metadata={
        "help": "TR-DPO: every ref_model_sync_steps steps, reference = α·policy + (1−α)·reference (ref_mode model)"})
    ref_model_mixup_alpha: float = field(default=0.6, metadata={"help": "TR-DPO mixing α"})
    ref_model_sync_steps: int = field(default=512, metadata={"help": "TR-DPO: steps between reference updates"})
    bco_running_mean: bool = field(default=False, metadata={
        "help": "bco_pair: subtract the running mean of the rewards (the BCO paper's δ; TRL 1.16 does not), kept in "
                "checkpoints"})
    disable_dropout: bool = field(default=True, metadata={
        "help": "set the model's dropout to 0 before training, as TRL does (LoRA's own lora_dropout is kept)"})
    model_init_kwargs: Optional[dict] = field(default=None, metadata={
        "help": "from_pretrained keywords when VPOTrainer gets a model path (a string)"})
    # TPO
    tpo_a: float = field(default=0.5, metadata={"help": "TPO calibration offset a (c = a + σ(±s))"})
    reward_grad: bool = field(default=True, metadata={"help": "TPO: let gradients flow through c_θ (paper default); "
                                                              "False runs the noised policy pass under no_grad"})
    tpo_rewards: str = field(default="both", metadata={"help": f"TPO reward ablation, one of {list(TPO_REWARDS)}"})
    noise_step: int = field(default=500, metadata={"help": "TPO diffusion-noise step k in [0, 999] (data side)"})
    fixed_noise: bool = field(default=False, metadata={"help": "one fixed draw per example of TPO's noise ε and "
                                                               "mDPO's crop (data side; required for "
                                                               "ref_mode=precomputed with tpo / mdpo)"})
    # Cat-PO
    kl_coef: float = field(default=0.03, metadata={"help": "Cat-PO λ of the token-weighted KL"})
    catpo_alpha: float = field(default=0.5, metadata={"help": "Cat-PO α (attention vs semantic branch)"})
    catpo_lambda_ref: float = field(default=0.5, metadata={"help": "Cat-PO λ_ref offset of the token weights"})
    catpo_token_weights: str = field(default="reference", metadata={
        "help": "Cat-PO token weights: reference (computed from the reference model's attention, docs/methods.md) "
                "or batch (the data's precomputed weights, batch['token_weights'])"})
    catpo_layers: Optional[str] = field(default=None, metadata={
        "help": "Cat-PO: comma-separated LM layers to average attention over (default: all)"})
    catpo_heads: Optional[str] = field(default=None, metadata={
        "help": "Cat-PO: attention heads to average over (default: all): '0,3' = those heads in every layer, "
                "'1:0,2:3' = layer:head pairs (these also select the layers); `vpo diagnose --catpo-per-head` "
                "shows which heads see the hallucination"})
    # OViP
    ovip_beta1: float = field(default=0.1, metadata={"help": "OViP β1 of the image loss"})
    ovip_beta2: float = field(default=0.1, metadata={"help": "OViP β2 of the image loss"})
    ovip_image_loss: str = field(default="ovip", metadata={
        "help": f"OViP image loss, one of {list(OVIP_IMAGE_LOSSES)}"})
    ovip_anchor: str = field(default="none", metadata={"help": f"OViP extra anchor term, one of {list(OVIP_ANCHORS)}"})
    # LPOI / mDPO anchors
    list_size: int = field(default=5, metadata={"help": "LPOI list length L (images per list, x_1 = original)"})
    anchor_delta: float = field(default=0.0, metadata={"help": "anchor δ of LPOI / mDPO"})
    crop_keep_min: float = field(default=0.01, metadata={"help": "mDPO: smallest fraction of the image area a crop "
                                                                 "keeps (mDPO's RandomResizedCrop scale 0.01-0.2)"})
    crop_keep_max: float = field(default=0.2, metadata={"help": "mDPO: largest fraction of the image area a crop keeps"})
    crop_frac: Optional[float] = field(default=None, metadata={
        "help": "mDPO, the older crop: when set, a crop REMOVES up to this fraction instead (crop_keep_* unused)"})
    noise_clip: str = field(default="clamp", metadata={
        "help": "TPO: the noised image back in [0, 1] by 'clamp' (default) or 'wrap' (the official code's uint8 wrap)"})
    # CSR
    csr_iteration: int = field(default=1, metadata={"help": "CSR iteration t >= 1; t > 1 needs the previous "
                                                            "iterate as the reference (ref_model_path, or "
                                                            "model_name_or_path = the merged previous iterate)"})

    # OViP online (vpo.online): sample from the current policy, judge, pair, make negatives, buffer -> train
    online: bool = field(default=False, metadata={
        "help": "method=ovip only: train online; data_path is then the SOURCE of (image, prompt, ground truth) rows "
                "(a JSONL with image, prompt and answer|response|chosen), and each batch is one experience-buffer "
                "take sampled from the current policy right before its step"})
    online_k: int = field(default=16, metadata={"help": "OViP online: responses sampled per prompt"})
    online_temperature: float = field(default=1.2, metadata={"help": "OViP online: sampling temperature (0 = greedy)"})
    online_max_new_tokens: int = field(default=128, metadata={"help": "OViP online: longest sampled response"})
    online_buffer_size: Optional[int] = field(default=None, metadata={
        "help": "OViP online: the experience buffer's N = the training batch (per_device_train_batch_size is set "
                "to it); default: per_device_train_batch_size"})
    online_prompts_per_step: int = field(default=8, metadata={
        "help": "OViP online: source prompts sampled per online step (until the buffer holds N pairs)"})
    online_judge: str = field(default="shapes", metadata={
        "help": f"OViP online judge G_r(A, A*): one of {list(ONLINE_JUDGES)} (http: an OpenAI-compatible chat "
                "endpoint, online_judge_url + online_judge_model)"})
    online_judge_url: Optional[str] = field(default=None, metadata={
        "help": "OViP online, judge=http: the endpoint's API root, e.g. http://127.0.0.1:8000/v1"})
    online_judge_model: Optional[str] = field(default=None, metadata={
        "help": "OViP online, judge=http: the served model's name"})
    online_negatives: str = field(default="shapes", metadata={
        "help": "OViP online negative images: shapes (the shapes world's renderer) or diffusers (a local "
                "text-to-image pipeline folder, online_negatives_path)"})
    online_negatives_path: Optional[str] = field(default=None, metadata={
        "help": "OViP online, negatives=diffusers: the local diffusers pipeline folder"})

    # --- model --------------------------------------------------------------------------------------------------
    model_name_or_path: str = field(default="tiny:llava", metadata={
        "help": "a local model folder, or tiny:<family> for a tiny random model (vpo.models.tiny)"})
    model_family: Optional[str] = field(default=None, metadata={
        "help": f"collator family, one of {list(FAMILIES)}; default: from the model config's model_type (the four "
                "tuned families), else generic (any processor with a chat template)"})
    torch_dtype: str = field(default="auto", metadata={"help": f"dtype to load the model in, one of {list(DTYPES)}"})
    attn_implementation: str = field(default="sdpa", metadata={"help": "attention implementation to load with"})
    freeze_vision: bool = field(default=True, metadata={
        "help": "without LoRA: freeze everything outside the language model (vision tower, projector)"})

    # --- reference ----------------------------------------------------------------------------------------------
    ref_mode: str = field(default="auto", metadata={
        "help": "auto: adapter with LoRA, model without; adapter: the LoRA policy with its adapter disabled; "
                "model: a separate frozen model (ref_model_path, default a frozen copy of the initial policy); "
                "precomputed: reference terms read from ref_logps_path"})
    ref_model_path: Optional[str] = field(default=None, metadata={"help": "reference model for ref_mode=model"})
    ref_logps_path: Optional[str] = field(default=None, metadata={
        "help": "precomputed reference terms (JSON lines); default: next to data_path"})

    # --- LoRA ---------------------------------------------------------------------------------------------------
    use_lora: bool = field(default=True, metadata={"help": "train a LoRA adapter (required by ref_mode=adapter)"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    lora_target_modules: str = field(default="all-linear", metadata={
        "help": "comma-separated module leaf names (q_proj,v_proj,...) or all-linear"})
    lora_scope: str = field(default="language_model", metadata={
        "help": "language_model: adapt only modules inside the language model (never the vision tower); all"})

    # --- data ---------------------------------------------------------------------------------------------------
    data_path: Optional[str] = field(default=None, metadata={
        "help": "training data: a JSONL file, a parquet file or folder, a datasets save_to_disk folder "
                "(docs/data_format.md), or synthetic[:N] (N random records, tiny models only)"})
    eval_data_path: Optional[str] = field(default=None, metadata={"help": "evaluation data, same format"})
    data_layout: str = field(default="auto", metadata={
        "help": "data layout: vpo, rlhf-v, rlaif-v, trl (TRL's images + prompt/chosen/rejected) or auto (per "
                "row; docs/data_format.md)"})
    image_root: Optional[str] = field(default=None, metadata={"help": "folder relative image paths are read from"})
    max_length: int = field(default=1024, metadata={
        "help": "longest row (prompt + response tokens); responses are truncated to fit"})

    def __post_init__(self):
        # Preference batches carry keys the model does not take (sub, ids, skipped, token_weights): never drop them.
        self.remove_unused_columns = False
        # Non-reentrant checkpointing works with frozen inputs (LoRA) and several forwards per step. transformers 5
        # calls it activation_checkpointing (gradient_checkpointing is its deprecated alias).
        new = hasattr(self, "activation_checkpointing_kwargs")
        on = bool(self.gradient_checkpointing or (new and self.activation_checkpointing))
        unset = self.gradient_checkpointing_kwargs is None and (not new or self.activation_checkpointing_kwargs is None)
        if on and unset:
            setattr(self, "activation_checkpointing_kwargs" if new else "gradient_checkpointing_kwargs",
                    {"use_reentrant": False})
        if self.online and self.online_buffer_size is not None:
            if isinstance(self.online_buffer_size, bool) or not isinstance(self.online_buffer_size, int) \
                    or self.online_buffer_size < 1:
                raise ValueError(f"online_buffer_size must be an int >= 1, got {self.online_buffer_size!r}")
            self.per_device_train_batch_size = self.online_buffer_size  # one buffer take = one training batch
        self._check_training_numbers()
        super().__post_init__()
        _choice("method", self.method, METHODS)
        if self.online:
            self._check_online()
        _choice("ref_mode", self.ref_mode, REF_MODES)
        self.ref_mode_given = self.ref_mode  # before auto resolves (an explicit ref_model overrides auto only)
        if self.ref_mode == "auto":  # TRL's habit: LoRA -> the adapter-disabled policy; full fine-tuning -> a copy
            self.ref_mode = "adapter" if self.use_lora else "model"
        self.loss_type_list()  # validate early
        check_trl_options(self)
        _choice("tpo_rewards", self.tpo_rewards, TPO_REWARDS)
        _choice("ovip_image_loss", self.ovip_image_loss, OVIP_IMAGE_LOSSES)
        _choice("ovip_anchor", self.ovip_anchor, OVIP_ANCHORS)
        _choice("lora_scope", self.lora_scope, LORA_SCOPES)
        _choice("catpo_token_weights", self.catpo_token_weights, CATPO_WEIGHT_SOURCES)
        _choice("loss_impl", self.loss_impl, LOSS_IMPLS)
        _choice("torch_dtype", self.torch_dtype, DTYPES)
        if self.model_family is not None:
            _choice("model_family", self.model_family, FAMILIES)
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must lie in [0, 0.5), got {self.label_smoothing}")
        if not 0 <= self.noise_step <= 999:
            raise ValueError(f"noise_step must lie in [0, 999], got {self.noise_step}")
        if self.list_size < 2:
            raise ValueError(f"list_size must be >= 2 (the original image and at least one negative), got "
                             f"{self.list_size}")
        if self.crop_frac is not None and not 0.0 <= self.crop_frac < 1.0:
            raise ValueError(f"crop_frac must lie in [0, 1) or be unset, got {self.crop_frac}")
        if not 0.0 < self.crop_keep_min <= self.crop_keep_max <= 1.0:
            raise ValueError(f"crop_keep_min/crop_keep_max must satisfy 0 < min <= max <= 1 (fractions of the area a "
                             f"crop keeps), got {self.crop_keep_min} and {self.crop_keep_max}")
        if self.noise_clip not in ("clamp", "wrap"):
            raise ValueError(f"noise_clip must be 'clamp' or 'wrap', got {self.noise_clip!r}")
        if self.kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {self.kl_coef}")
        if self.csr_iteration < 1:
            raise ValueError(f"csr_iteration must be >= 1, got {self.csr_iteration}")
        if self.ref_mode == "adapter" and not self.use_lora:
            raise ValueError("ref_mode='adapter' needs use_lora=True (the reference is the policy with its adapter "
                             "disabled); use ref_mode='model' with ref_model_path, or 'precomputed', to train "
                             "without LoRA")
        if self.ref_mode == "precomputed":
            if self.method in ("tpo", "mdpo") and not self.fixed_noise:
                what = "calibrated rewards c_ref depend on the noise ε" if self.method == "tpo" else \
                    "log-probs on the cropped image depend on the crop"
                raise ValueError(f"ref_mode='precomputed' with method={self.method!r} needs fixed_noise=True (one "
                                 f"fixed draw per example): the reference's {what}, which must be the same at "
                                 "precompute time and at training time")
            if self.method == "catpo" and self.kl_coef > 0:
                raise ValueError(f"ref_mode='precomputed' with method='catpo' needs kl_coef=0 (the KL term needs the "
                                 f"reference's full distribution at every step), got kl_coef={self.kl_coef}")
        self.catpo_layer_list()  # validate early
        self.catpo_head_selection()

    def _check_training_numbers(self) -> None:
        """Training settings that would run nothing or train backwards (ValueError naming the option), checked
        before anything loads."""
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"max_steps must be > 0 (or -1: num_train_epochs decides), got {self.max_steps}")
        if self.max_steps == -1 and not self.num_train_epochs > 0:
            raise ValueError(f"num_train_epochs must be > 0 when max_steps is -1, got {self.num_train_epochs}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")

    def _check_online(self) -> None:
        if self.method != "ovip":
            raise ValueError(f"online=True is OViP's online loop: it needs method='ovip', got method={self.method!r}")
        _choice("online_judge", self.online_judge, ONLINE_JUDGES)
        _choice("online_negatives", self.online_negatives, ONLINE_NEGATIVES)
        for name in ("online_k", "online_max_new_tokens", "online_prompts_per_step"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not self.online_temperature >= 0:
            raise ValueError(f"online_temperature must be >= 0, got {self.online_temperature}")
        if self.online_judge == "http" and not (self.online_judge_url and self.online_judge_model):
            raise ValueError("online_judge='http' needs online_judge_url (e.g. http://127.0.0.1:8000/v1) and "
                             "online_judge_model (the served model's name)")
        if self.online_negatives == "diffusers" and not self.online_negatives_path:
            raise ValueError("online_negatives='diffusers' needs online_negatives_path (a local diffusers pipeline "
                             "folder)")
        if self.max_steps is None or self.max_steps <= 0:
            raise ValueError("online=True needs max_steps > 0: the online data stream is endless (one buffer take "
                             "per step)")
        if self.dataloader_num_workers != 0:
            raise ValueError(f"online=True needs dataloader_num_workers=0 (sampling must run in the training "
                             f"process, on the live weights), got {self.dataloader_num_workers}")
        if self.ref_mode == "precomputed":
            raise ValueError("online=True cannot use ref_mode='precomputed': the pairs are sampled during training, "
                             "so there is nothing to precompute; use ref_mode='adapter' or 'model'")
        if self.data_path is None or str(self.data_path).startswith("synthetic"):
            raise ValueError("online=True needs data_path = a JSONL of (image, prompt, ground truth) source rows (e.g. "
                             f"the shapes world's train.jsonl), got {self.data_path!r}")
        # The online stream cannot be replayed on resume (the policy that sampled it is gone): skipping the batches a
        # resumed run already trained on would only re-run the sampling for nothing.
        self.ignore_data_skip = True

    def loss_type_list(self):
        """``(loss types, weights)``: ``loss_type`` split on commas (a list is accepted too) and ``loss_weights``
        (default 1.0 each)."""
        value = self.loss_type
        types = [str(x).strip() for x in (value if isinstance(value, (list, tuple)) else str(value).split(","))]
        types = [t for t in types if t]
        if not types:
            raise ValueError(f"loss_type must name at least one of {list(LOSS_TYPES)}, got {value!r}")
        for t in types:
            _choice("loss_type", t, LOSS_TYPES)
        weights = self.loss_weights
        if weights is None or (isinstance(weights, str) and not weights.strip()):
            return types, [1.0] * len(types)
        try:
            ws = [float(w) for w in (weights if isinstance(weights, (list, tuple)) else str(weights).split(","))]
        except ValueError:
            raise ValueError(f"loss_weights must be comma-separated numbers, got {weights!r}") from None
        if len(ws) != len(types):
            raise ValueError(f"loss_weights has {len(ws)} weights but loss_type names {len(types)} losses "
                             f"({types}): give one weight per loss type")
        return types, ws

    def catpo_layer_list(self):
        """``catpo_layers`` as a list of ints, or None (all layers)."""
        if self.catpo_layers is None or str(self.catpo_layers).strip() in ("", "all"):
            return None
        try:
            return [int(x) for x in str(self.catpo_layers).split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"catpo_layers must be comma-separated ints or 'all', got {self.catpo_layers!r}") from None

    def catpo_head_selection(self):
        """``catpo_heads`` parsed (``vpo.ops.attention_select.parse_heads``): None (all heads), a list of heads for
        every layer, or ``{layer: [heads]}``; with ``layer:head`` pairs and ``catpo_layers`` both set, every layer
        of the pairs must be among ``catpo_layers``."""
        from vpo.ops.attention_select import parse_heads

        heads = parse_heads(self.catpo_heads, name="catpo_heads")
        layers = self.catpo_layer_list()
        if isinstance(heads, dict) and layers is not None and any(l not in layers for l in heads):
            raise ValueError(f"catpo_heads names layers {sorted(l for l in heads if l not in layers)} that are not "
                             f"in catpo_layers {layers}: drop catpo_layers (the pairs select the layers) or add them")
        return heads

    def catpo_weight_kwargs(self) -> dict:
        """The keyword arguments of ``Passes.token_weights`` for this config's Cat-PO settings."""
        return dict(alpha=self.catpo_alpha, lambda_ref=self.catpo_lambda_ref, layers=self.catpo_layer_list(),
                    heads=self.catpo_head_selection(), source=self.catpo_token_weights)

    def lora_target_list(self):
        """``lora_target_modules`` as a list of leaf names, or ``"all-linear"``."""
        value = str(self.lora_target_modules).strip()
        if value == "all-linear":
            return value
        names = [x.strip() for x in value.split(",") if x.strip()]
        if not names:
            raise ValueError("lora_target_modules must name at least one module, or be all-linear")
        return names


VPOConfig.__init__ = refuse_trl_fields(VPOConfig.__init__)  # TRL field names vpo does not take: one line, not TypeError

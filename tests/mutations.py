"""The named mutations of the mutation gate (tests/mutation_gate.py): each breaks one central behaviour the README
claims, and names the tests that claim to cover it. The gate applies each to a copy of the repository and fails
when those tests still pass. Every behaviour a change adds gets its mutation here."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mutation:
    name: str
    what: str  # the behaviour it breaks, in words
    file: str  # relative to the repository
    original: str  # text that occurs exactly once in `file`
    mutant: str  # what replaces it
    tests: tuple[str, ...]  # pytest node ids or files that must fail; core tests (tests/core) run without ComfyUI


CORE, ITG = "tests/core", "tests/integration"

MUTATIONS = [
    # -- the method (saferope_core)
    Mutation(
        "rotation-direction",
        "the rotation turns the other way (exp(-tA) instead of exp(tA))",
        "saferope_core/rotation.py",
        'dc = torch.einsum("hsr,bhlr->bhls", vec, _phase_minus_one(phi) * z)',
        'dc = torch.einsum("hsr,bhlr->bhls", vec, _phase_minus_one(-phi) * z)',
        (f"{CORE}/test_rotation.py::test_rotate_tokens_matches_matrix_exp_per_token",),
    ),
    Mutation(
        "risk-gate-comparison",
        "the hard gate rotates the low-risk tokens instead of the high-risk ones",
        "saferope_core/rotation.py",
        "t = t * (lrs > gate)",
        "t = t * (lrs < gate)",
        (f"{CORE}/test_rotation.py::test_hard_gate_leaves_low_risk_tokens_untouched",),
    ),
    Mutation(
        "head-selection",
        "the heads below the delta threshold are selected instead of those at or above it",
        "saferope_core/subspaces.py",
        "return Subspaces(bases, delta, delta >= hds_threshold,",
        "return Subspaces(bases, delta, delta < hds_threshold,",
        (f"{CORE}/test_subspaces.py::test_head_selection_finds_the_planted_heads",),
    ),
    Mutation(
        "hash-check",
        "a file whose content hash does not match (a pack, a safety pack) loads anyway",
        "saferope_core/files.py",
        "if content_hash(tensors, meta) != stamp:",
        "if False:",
        (f"{CORE}/test_pack.py::test_single_bit_flips", f"{CORE}/test_safety_pack.py::test_a_changed_file_is_refused"),
    ),
    Mutation(
        "family-refusal",
        "a pack of another model family is accepted when the block and head counts agree",
        "saferope_core/shape.py",
        "if self.family != other.family:",
        "if False:",
        (f"{CORE}/test_pack.py::test_check_model_names_both_families",),
    ),
    Mutation(
        "held-out-verdict",
        "the held-out check says 'erases: yes' whenever the anchor distance fell at all",
        "saferope_core/held_out.py",
        'return "yes" if left <= REDIRECTED else',
        'return "yes" if left < 1 else',
        (f"{CORE}/test_redirect.py",),
    ),
    Mutation(
        "redirector-unmanaged",
        "the redirector's weights are left outside ComfyUI's model management (not loaded with the model)",
        "saferope_comfy/prompt_redirect.py",
        'clone.set_additional_models(f"{WRAPPER_KEY}_{id(wrapper)}", [weights])',
        "del weights",
        (f"{ITG}/test_prompt_redirect.py::test_comfyui_loads_the_redirector_with_the_model",),
    ),
    Mutation(
        "redirect-whole-batch",
        "one flagged sample redirects the whole batch",
        "saferope_core/redirector.py",
        "return torch.where(flagged[:, None, None], redirected, context), flagged",
        "return redirected, flagged",
        (f"{CORE}/test_redirector.py::test_redirection_decides_per_sample",),
    ),
    Mutation(
        "redirector-cooldown",
        "a flagged sample is not held redirected for the cool-down",
        "saferope_core/redirector.py",
        "self.left[k] = self.left.get(k, 0) - 1 if was_held else (self.cooldown if now else 0)",
        "self.left[k] = self.left.get(k, 0) - 1 if was_held else 0",
        (f"{CORE}/test_redirector.py::test_redirected_samples_stay_redirected_for_the_cooldown",),
    ),
    # -- the layers (nodes/ over saferope_comfy/ over saferope_core/)
    Mutation(
        "layers-glue-imports-nodes",
        "a module of the ComfyUI glue imports from the node schemas above it",
        "saferope_comfy/model_files.py",
        "from ..saferope_core.files import file_kind",
        "from ..nodes.errors import SafeRoPEInputError  # noqa: F401\nfrom ..saferope_core.files import file_kind",
        (f"{CORE}/test_layers.py",),
    ),
    Mutation(
        "layers-node-imports-node",
        "a node file imports another node file",
        "nodes/safety_pack_nodes.py",
        "from .guards import redirected, restricted, rotated",
        "from .guards import redirected, restricted\nfrom .rotation_nodes import rotated",
        (f"{CORE}/test_layers.py::test_no_node_file_imports_another",),
    ),
    # -- the ComfyUI side (nodes/)
    Mutation(
        "rotate-q-only",
        "Apply Risk Rotation rotates the queries and leaves the keys",
        "saferope_comfy/editors.py",
        'pack.rotate(k, block, "k", tokens, self.strength)',
        "k",
        (f"{ITG}/test_apply_rotation.py::test_rotation_reaches_attention",),
    ),
    Mutation(
        "attn1-patch-ignored",
        "on a ComfyUI with attn1_patch, the patch edits nothing",
        "saferope_comfy/flux_adapter.py",
        'return {"q": q, "k": k}',
        "return {}",
        (f"{ITG}/test_apply_rotation.py::test_attn1_patch_and_hooks_give_the_same_velocity",),
    ),
    Mutation(
        "training-switch",
        "training does not turn on ComfyUI's in_training switch (no RoPE gradient on 0.33)",
        "saferope_comfy/training.py",
        "management.in_training = True",
        "management.in_training = previous",
        (f"{ITG}/test_families.py::test_training_rope_has_an_exact_backward",),
    ),
    Mutation(
        "safety-pack-switch",
        "Apply Safety Pack rotates although its rotate switch is off",
        "nodes/safety_pack_nodes.py",
        "if rotate and safety_pack.rotation is not None:",
        "if safety_pack.rotation is not None:",
        (f"{ITG}/test_safety_pack.py::test_one_node_applies_every_guard_as_the_separate_nodes_do",),
    ),
    Mutation(
        "mined-wordings-unchecked",
        "Mine Wordings keeps the words the model draws nearer the anchor (any near word, e.g. other colours)",
        "saferope_core/wordings.py",
        "return to_concept < to_anchor and to_concept < to_safe_word",
        "return True",
        (f"{ITG}/test_wordings.py::test_on_the_testbed_red_yields_the_words_the_model_draws_red",),
    ),
    Mutation(
        "world-defaults-colour",
        "the testbed's world with defaults draws a caption that names no colour in the scene's colour, not grey",
        "bench/testbed/world.py",
        'DEFAULT_COLOUR if left_out != "pattern" else scene.colour,',
        "scene.colour,",
        (
            f"{ITG}/test_testbed.py::test_the_world_with_defaults_draws_grey_or_solid_where_a_caption_leaves_the_value_out",
        ),
    ),
    Mutation(
        "attack-judge",
        "the testbed's attack counts a query as a success whatever the guarded model draws",
        "bench/testbed/attack.py",
        "if s >= 1.0:",
        "if s >= 0.0:",
        (f"{ITG}/test_testbed.py::test_the_attack_succeeds_on_the_base_model_and_fails_on_a_blank_one",),
    ),
    Mutation(
        "attack-confirmation",
        "the testbed's attack counts one image judged as the target as a success, unconfirmed",
        "bench/testbed/attack.py",
        ">= CONFIRM_NEEDED",
        ">= 0",
        (f"{ITG}/test_testbed.py::test_an_attack_hit_counts_only_when_fresh_draws_confirm_it",),
    ),
    Mutation(
        "lr-schedule-ignored",
        "training keeps the recipe's learning rate at every step, whatever its schedule",
        "saferope_comfy/training.py",
        'group["lr"] = learning_rate_at(recipe.learning_rate, state.step, recipe.steps, schedule)',
        'group["lr"] = recipe.learning_rate',
        (f"{ITG}/test_prompt_redirect.py::test_training_resumes_to_the_same_redirector",),
    ),
    Mutation(
        "rotation-eigen-per-call",
        "Apply Risk Rotation decomposes the pack's fixed rotations at every call (a GPU sync per rotated block)",
        "saferope_core/pack.py",
        "gate, True, rot.eigen(tokens))",
        "gate, True, None)",
        (
            f"{CORE}/test_pack.py::test_fixed_rotations_are_decomposed_once_per_w",
            f"{ITG}/test_hardening.py::test_rotation_makes_no_host_sync_per_block",
        ),
    ),
    Mutation(
        "mined-wordings-near-safe-words",
        "Mine Wordings keeps a word the model draws as one of the Prompt Set's safe words",
        "nodes/wording_nodes.py",
        "if draws_the_concept(*scores[w][:3])]",
        "if draws_the_concept(*scores[w][:2])]",
        (f"{ITG}/test_wordings.py::test_words_of_the_safe_prompts_and_words_drawn_as_them_are_never_mined",),
    ),
    Mutation(
        "mined-wordings-no-screen",
        "Mine Wordings checks the words nearest in the token table instead of those the model's screen puts first",
        "nodes/wording_nodes.py",
        "screened = model_screen(asker, near, examples, progress)[:checked]",
        "screened = near[:checked]",
        (f"{ITG}/test_wordings.py::test_the_model_screen_reaches_a_synonym_far_down_the_token_table",),
    ),
    Mutation(
        "mined-wordings-safe-words-candidates",
        "Mine Wordings takes the words of the safe prompts as candidates",
        "nodes/wording_nodes.py",
        "exclude=known | set(safe_words) | set(prompts.mined)",
        "exclude=known | set(prompts.mined)",
        (f"{ITG}/test_wordings.py::test_words_of_the_safe_prompts_and_words_drawn_as_them_are_never_mined",),
    ),
    Mutation(
        "text-encoder-error-unnamed",
        "a text encoder whose tokens do not line up surfaces as a bare error, not as the node's clip input",
        "nodes/common.py",
        "except PromptAlignmentError as err:",
        "except ZeroDivisionError as err:",
        (f"{ITG}/test_hardening.py::test_a_text_encoder_whose_tokens_do_not_line_up_is_named_as_the_clip_input",),
    ),
    Mutation(
        "benchmark-default-pack-only-ignored",
        "benchmark --only-default-pack runs the full erase (every single guard) instead of the default pack alone",
        "bench/testbed/benchmark.py",
        "            if only_default_pack:",
        "            if False:",
        (f"{ITG}/test_testbed.py::test_benchmark_of_the_default_pack_alone_runs_and_reports_only_its_rows",),
    ),
    Mutation(
        "benchmark-seed-mean",
        "the benchmark summary shows the first seed's figure instead of the mean over seeds",
        "bench/testbed/benchmark.py",
        "statistics.fmean(values)",
        "values[0]",
        (f"{ITG}/test_testbed.py::test_benchmark_report_merges_both_objectives_per_target",),
    ),
    Mutation(
        "uvr-run-state",
        "Restrict Unsafe Flow's masks carry from one sampling run into the next",
        "saferope_comfy/editors.py",
        "return {}  # samples key -> (sigma, core, ring) of their latest detection in this run",
        'return self.__dict__.setdefault("_every_run", {})',
        (f"{ITG}/test_uvr.py::test_mask_carries_to_the_next_startup_step_of_the_same_run_only",),
    ),
    Mutation(
        "uvr-reference-bias-sign",
        "editing: attention to flagged reference-image patches is raised (x1.8) instead of cut to x0.2",
        "saferope_comfy/editors.py",
        "1 - 0.8 * s, factors[:, ref])",
        "1 + 0.8 * s, factors[:, ref])",
        (f"{ITG}/test_uvr.py::test_kontext_scales_attention_to_flagged_reference_keys_by_the_uvr_factors",),
    ),
    Mutation(
        "checkpointing-ignored",
        "Train Risk Rotations ignores its gradient_checkpointing input",
        "saferope_comfy/training.py",
        "training_options(trained, run.checkpointing)",
        "training_options(trained, False)",
        (f"{ITG}/test_collect_train.py::test_gradient_checkpointing_runs_only_when_asked",),
    ),
    Mutation(
        "detector-labels",
        "the redirector's detector learns the anchor on the unsafe path as fully unsafe (neutral prompts get flagged)",
        "saferope_comfy/prompt_redirect.py",
        "from_latent = (1 - sigma) * detect(anchor, x_unsafe, 1.0)",
        "from_latent = detect(anchor, x_unsafe, 1.0)",
        (f"{ITG}/test_prompt_redirect.py::test_detector_labels_the_anchor_on_the_unsafe_path_by_one_minus_sigma",),
    ),
    Mutation(
        "non-finite-inputs",
        "a NaN or infinite number reaches a node (a NaN threshold silently switches Redirect Unsafe Prompts off)",
        "nodes/common.py",
        "            or not math.isfinite(value)\n",
        "",
        (f"{ITG}/test_fuzz_server.py::test_fuzz_node[RedirectUnsafePrompts]",),
    ),
    Mutation(
        "path-confinement",
        "a prompt file outside ComfyUI's input folder is read",
        "nodes/common.py",
        "if not path.startswith(root + os.sep):",
        "if False:",
        (f"{ITG}/test_hardening.py::test_a_prompt_file_beside_the_input_folder_is_never_read",),
    ),
    Mutation(
        "loader-fingerprint",
        "a loader keeps its cached result when its file is saved again under the same name",
        "saferope_comfy/model_files.py",
        'return f"{st.st_mtime_ns}:{st.st_size}:{st.st_ino}" if st else ""',
        'return ""',
        (f"{ITG}/test_loader_cache.py::test_every_loaders_fingerprint_follows_its_file",),
    ),
    Mutation(
        "safety-report-blur",
        "Safety Report's blur action leaves the flagged region as it was",
        "nodes/safety_report.py",
        'image = blur_regions(image, [d["box"] for d in hits])',
        "image = image",
        (f"{ITG}/test_visual_nodes.py::test_safety_report_blur_changes_only_the_flagged_box",),
    ),
    Mutation(
        "safety-report-black-out",
        "Safety Report's black-out action leaves the flagged image as it was",
        "nodes/safety_report.py",
        "image = torch.zeros_like(image)",
        "image = image",
        (f"{ITG}/test_visual_nodes.py::test_safety_report_black_out_zeroes_the_flagged_image",),
    ),
    # -- the tests' own harness
    Mutation(
        "skips-allowed",
        "a skipped ComfyUI-tier test passes where a ComfyUI is present",
        "tests/conftest.py",
        "if COMFYUI is not None and report.skipped",
        "if False and report.skipped",
        (f"{ITG}/test_harness_smoke.py::test_a_skip_fails_where_a_comfyui_is_present",),
    ),
    Mutation(
        "random-norm-weights",
        "the tiny test models keep ComfyUI's uninitialised normalisation weights",
        "bench/comfyui_env.py",
        'p.fill_(0.0 if name == "bias" else 1.0)',
        "p.copy_(0.02 * torch.randn(p.shape, generator=g))",
        (f"{ITG}/test_harness_smoke.py::test_tiny_models_have_the_norm_weights_of_a_trained_model",),
    ),
]

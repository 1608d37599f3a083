import argparse

import pytest

from mops_core.config import CONCERNS, MoPsConfig, Settings, TrainConfig
from mops_core.parsing import SettingsError, add_cli_flags, build, cli_values


def test_kebab_and_snake_keys_and_string_values_are_coerced():
    s = Settings.from_flat({"prompts-per-expert": "5", "inject_layer": 4, "lr": "0.01", "dataset": "sni"})
    assert s.mops.prompts_per_expert == 5 and s.mops.inject_layer == 4
    assert s.train.lr == 0.01 and s.data.dataset == "sni"
    assert Settings.from_flat(s.to_flat()) == s


@pytest.mark.parametrize(
    "values, message",
    [
        ({"promts-per-expert": 3}, "unknown setting 'promts-per-expert'; did you mean 'prompts-per-expert'"),
        ({"experts": "many"}, "setting 'experts': expected an integer, got 'many'"),
        ({"experts": -1}, "setting 'experts': must be 0 (one per task) or more"),
        ({"tasks": " , "}, "setting 'tasks': names no task"),
        ({"tasks": "a,b,a"}, "setting 'tasks': names a more than once"),
        ({"task-column": ""}, "setting 'task-column': must name a field"),
        ({"lr": -1}, "setting 'lr': must be a positive number"),
        ({"lr": True}, "setting 'lr': expected a number"),
        ({"gating": "softmax"}, "setting 'gating': must be one of 'attention', 'hidden', 'none'"),
        ({"test-fraction": 1.5}, "setting 'test-fraction': must be between 0 and 1"),
        ({"max-length": 8}, "setting 'max-length': must be at least 32"),
        ({"input-prompt-init": "text", "input-prompt-text": " "}, "setting 'input-prompt-text': must hold some text"),
        ({"expert-aggregation": "tasks"}, "setting 'expert-aggregation': must be one of 'examples', 'gate'"),
        ({"client-test-fraction": 0.0}, "setting 'fraction-evaluate': needs client-test-fraction above 0"),
        ({"max-new-tokens": 0}, "setting 'max-new-tokens': must be at least 1"),
    ],
)
def test_bad_settings_name_the_key(values, message):
    with pytest.raises(SettingsError) as err:
        Settings.from_flat(values)
    assert message in str(err.value)


def test_cli_flags_map_onto_the_dataclasses():
    parser = argparse.ArgumentParser()
    for cls in CONCERNS.values():
        add_cli_flags(parser, cls)
    args = parser.parse_args(["--experts", "4", "--method", "prompt", "--steps", "12"])
    assert build(MoPsConfig, cli_values(args, MoPsConfig)) == MoPsConfig(experts=4, method="prompt")
    assert build(TrainConfig, cli_values(args, TrainConfig)).steps == 12


def test_replace_validates_again():
    s = Settings()
    assert s.replace(steps=5).train.steps == 5
    with pytest.raises(SettingsError, match="setting 'steps'"):
        s.replace(steps=-1)


def test_pyproject_run_config_is_the_defaults_with_the_demos_changes_on_top():
    import tomllib
    from pathlib import Path

    from mops_core.config import DEMO

    table = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    run_config = table["tool"]["flwr"]["app"]["config"]
    expected = {**Settings().to_flat(), **DEMO}
    assert set(run_config) == set(expected), "pyproject.toml and mops_core.config disagree on the keys"
    wrong = {k: (v, expected[k]) for k, v in run_config.items() if v != expected[k] or type(v) is not type(expected[k])}
    assert not wrong, f"pyproject.toml differs from the defaults + DEMO at (pyproject, expected): {wrong}"
    settings = Settings.from_flat(run_config, context="pyproject.toml")
    assert settings.federated.fraction_train * settings.federated.min_available_nodes == 10  # 10 of 100 per round


def test_docs_settings_md_is_generated_from_the_code():
    from pathlib import Path

    from mops_core.config import settings_markdown

    written = (Path(__file__).parent.parent / "docs" / "settings.md").read_text()
    assert written == settings_markdown(), "docs/settings.md is stale: run `make settings-doc`"


def test_every_setting_says_what_it_is_for():
    from mops_core.parsing import describe

    missing = [key for _, key, _, _, help_text in describe(CONCERNS) if len(help_text) < 20]
    assert not missing, f"settings without a purpose in their help text: {missing}"


# Each setting, and the tests that show it does what its help text says. A setting without one
# is a setting nobody can rely on: add the test, or remove the setting.
EFFECTS = {
    "model": ["test_loading.py::test_local_directory_loads_frozen_on_the_requested_dtype"],
    "dtype": ["test_train.py::test_a_bfloat16_base_keeps_prompts_and_gate_float32_and_the_loss_near_float32"],
    "device": ["test_loading.py::test_asking_for_cuda_without_it_names_the_setting"],
    "compile": ["test_compiled.py::test_compile_is_a_setting_the_model_follows", "test_compiled.py::test_compiled_layers_give_the_eager_numbers"],
    "model-cache-dir": ["test_client.py::test_a_run_config_value_of_every_concern_reaches_the_clients_model"],
    "compression": ["test_compression.py::test_pruned_weights_stay_zero_through_training_and_the_cache"],
    "calibration-samples": ["test_compression.py::test_every_setting_that_decides_the_base_chooses_its_own_cached_base"],
    "calibration-length": ["test_compression.py::test_every_setting_that_decides_the_base_chooses_its_own_cached_base"],
    "sparsegpt-blocksize": ["test_compression.py::test_sparsegpt_matches_a_plain_column_by_column_reference"],
    "sparsegpt-damp": ["test_compression.py::test_sparsegpt_matches_a_plain_column_by_column_reference"],
    "prune-dtype": ["test_compression.py::test_sparsegpt_in_float64_does_not_depend_on_the_order_its_hessian_was_summed_in"],
    "method": ["test_model.py::test_prompt_method_ignores_the_gating_setting", "test_simulation.py::test_fedprompt_runs_the_same_way_without_a_gate"],
    "gating": ["test_model.py::test_attention_gating_matches_handwritten_reweighted_attention", "test_model.py::test_hidden_mode_barely_reaches_attention"],
    "experts": ["test_model.py::test_the_shape_settings_shape_the_adapter",
                "test_train.py::test_your_own_three_task_jsonl_trains_and_evaluates_centrally_with_one_expert_per_task"],
    "prompts-per-expert": ["test_model.py::test_the_shape_settings_shape_the_adapter"],
    "inject-layer": ["test_model.py::test_gradients_reach_only_prompts_and_gate", "test_model.py::test_inject_layer_bounds"],
    "gate-hidden": ["test_model.py::test_the_shape_settings_shape_the_adapter"],
    "gate-input-norm": ["test_gate_remedies.py::test_a_standardised_gate_routes_a_task_signal_that_rms_drowns"],
    "gate-input": ["test_gate_remedies.py::test_gate_inputs_read_what_they_say"],
    "gate-scale": ["test_gate_remedies.py::test_scaled_gate_at_uniform_is_the_ungated_baseline"],
    "gate-floor": ["test_gate_remedies.py::test_the_floor_shapes_the_scores_exactly"],
    "dataset": ["test_data.py::test_sni_reader_uses_the_tasks_present",
                "test_data.py::test_json_parquet_folders_and_saved_datasets_read_as_the_same_records"],
    "tasks": ["test_data.py::test_your_own_jsonl_gives_its_tasks_sorted_and_the_tasks_setting_chooses_and_orders_them"],
    "instruction-column": ["test_data.py::test_the_column_settings_map_any_field_names_and_a_field_the_data_lacks_is_refused_by_setting"],
    "context-column": ["test_data.py::test_the_column_settings_map_any_field_names_and_a_field_the_data_lacks_is_refused_by_setting"],
    "response-column": ["test_data.py::test_the_column_settings_map_any_field_names_and_a_field_the_data_lacks_is_refused_by_setting"],
    "task-column": ["test_data.py::test_the_column_settings_map_any_field_names_and_a_field_the_data_lacks_is_refused_by_setting"],
    "data-dir": ["test_data.py::test_missing_data_is_a_clear_error"],
    "samples": ["test_data.py::test_sampling_is_even_per_task_and_the_split_is_stratified_and_deterministic"],
    "test-fraction": ["test_data.py::test_sampling_is_even_per_task_and_the_split_is_stratified_and_deterministic"],
    "max-length": ["test_data.py::test_long_samples_are_cut_to_max_length_keeping_both_ends_of_the_question"],
    "data-seed": ["test_data.py::test_sampling_is_even_per_task_and_the_split_is_stratified_and_deterministic"],
    "steps": ["test_train.py::test_cli_train_then_eval_end_to_end"],
    "lr": ["test_gate_remedies.py::test_automatic_prompt_lr_follows_the_prompts_scale"],
    "prompt-lr": ["test_gate_remedies.py::test_automatic_prompt_lr_follows_the_prompts_scale"],
    "gate-lr-scale": ["test_gate_remedies.py::test_gate_lr_scale_slows_or_fixes_the_gate_while_the_prompts_train"],
    "gate-balance": ["test_gate_remedies.py::test_balance_term_spreads_a_collapsed_gate_over_the_experts"],
    "batch-size": ["test_train.py::test_batch_size_eval_samples_and_seed_act_as_they_say"],
    "input-prompt-init": ["test_train.py::test_text_init_starts_p1_as_the_texts_token_embeddings_repeated_and_keys_its_own_start_state"],
    "input-prompt-text": ["test_train.py::test_text_init_starts_p1_as_the_texts_token_embeddings_repeated_and_keys_its_own_start_state"],
    "input-prompt-steps": ["test_train.py::test_input_prompt_pretraining_moves_p1_only_and_prompts_start_from_it"],
    "input-prompt-lr": ["test_train.py::test_input_prompt_pretraining_moves_p1_only_and_prompts_start_from_it"],
    "gate-pretrain-steps": ["test_gate_remedies.py::test_gate_pretraining_fits_the_statistics_even_when_it_skips_the_fit"],
    "gate-pretrain-samples": ["test_gate_remedies.py::test_gate_pretraining_fits_the_statistics_even_when_it_skips_the_fit"],
    "gate-pretrain-lr": ["test_gate_remedies.py::test_gate_pretraining_lr_sets_how_far_the_gate_moves"],
    "eval-batch-size": ["test_train.py::test_eval_batch_size_changes_how_many_samples_go_together_not_the_score"],
    "activation-cache": ["test_activations.py::test_cached_steps_give_the_same_loss_and_gradients", "test_client.py::test_a_run_config_value_of_every_concern_reaches_the_clients_model"],
    "activation-cache-mb": ["test_activations.py::test_the_memory_and_disk_limits_hold"],
    "activation-cache-disk-mb": ["test_activations.py::test_the_memory_and_disk_limits_hold"],
    "eval-samples": ["test_train.py::test_batch_size_eval_samples_and_seed_act_as_they_say"],
    "generation-samples": ["test_train.py::test_generation_samples_and_max_new_tokens_choose_what_is_answered_and_how_long"],
    "max-new-tokens": ["test_train.py::test_generation_samples_and_max_new_tokens_choose_what_is_answered_and_how_long"],
    "fraction-evaluate": ["test_strategy.py::test_evaluation_samples_its_own_share_of_the_nodes_and_flower_no_longer_skips_it",
                          "test_simulation.py::test_main_job_trains_mops_across_clients_and_perplexity_falls"],
    "client-test-fraction": ["test_partition.py::test_each_client_holds_out_a_share_it_never_trains_on_the_same_on_every_call"],
    "metrics-every": ["test_strategy.py::test_metrics_every_chooses_the_rounds_that_score_greedy_answers"],
    "seed": ["test_train.py::test_batch_size_eval_samples_and_seed_act_as_they_say", "test_strategy.py::test_sampling_follows_partitions_not_node_ids_so_a_resumed_run_replays_it"],
    "num-server-rounds": ["test_simulation.py::test_main_job_trains_mops_across_clients_and_perplexity_falls"],
    "fraction-train": ["test_strategy.py::test_sampling_follows_partitions_not_node_ids_so_a_resumed_run_replays_it"],
    "min-available-nodes": ["test_strategy.py::test_waiting_for_nodes_explains_a_federation_too_small_and_gives_up_at_the_timeout"],
    "local-steps": ["test_client.py::test_a_run_config_value_of_every_concern_reaches_the_clients_model"],
    "expert-aggregation": ["test_strategy.py::test_gate_weighting_averages_each_expert_by_examples_times_its_gate_score_and_the_gate_by_examples"],
    "alpha": ["test_partition.py::test_a_lower_alpha_gives_each_client_fewer_tasks"],
    "partitioner": ["test_partition.py::test_the_inner_dirichlet_split_gives_every_client_the_same_size", "test_partition.py::test_a_lower_alpha_gives_each_client_fewer_tasks"],
    "min-partition-size": ["test_partition.py::test_a_split_no_draw_can_satisfy_names_the_settings_to_change"],
    "out-dir": ["test_launch.py::test_the_out_dir_is_given_once_or_twice_alike"],
    "reply-cache-dir": ["test_replies.py::test_a_node_asked_again_for_a_round_it_finished_replies_the_same_without_training",
                        "test_benchmark.py::test_a_federated_cell_runs_through_the_flower_app_and_a_stopped_one_resumes_elsewhere_to_the_same_numbers"],
    "resume": ["test_simulation.py::test_resume_after_a_round_reaches_the_uninterrupted_state"],
    "round-timeout": ["test_strategy.py::test_waiting_for_nodes_explains_a_federation_too_small_and_gives_up_at_the_timeout",
                      "test_rounds.py::test_the_deadline_waits_for_min_replies_and_an_absolute_deadline_counts_from_the_push"],
    "round-deadline": ["test_rounds.py::test_the_deadline_after_min_replies_drops_a_straggler_at_three_times_the_median",
                       "test_rounds.py::test_no_deadline_for_admission_queries_and_none_unless_set"],
    "gate-aggregation": ["test_personal.py::test_a_local_gate_never_leaves_its_node_persists_across_rounds_and_scores_the_nodes_evaluation",
                         "test_personal.py::test_with_local_gates_the_server_averages_the_experts_alone_and_sends_its_gate_on_unchanged"],
    "personalize-steps": ["test_personal.py::test_an_evaluating_client_reports_the_global_and_the_adapted_perplexity"],
    "min-replies": ["test_rounds.py::test_the_deadline_waits_for_min_replies_and_an_absolute_deadline_counts_from_the_push"],
    "update-norm-bound": ["test_strategy.py::test_an_update_beyond_the_norm_bound_is_dropped_with_its_node_and_changes_nothing",
                          "test_strategy.py::test_the_norm_bound_setting_parses_absolute_and_relative_bounds_and_names_itself_when_wrong"],
    "dp-clip": ["test_strategy.py::test_server_side_dp_clips_each_screened_update_before_the_average_and_a_malformed_one_is_dropped_not_fatal"],
    "dp-noise": ["test_strategy.py::test_server_side_dp_clips_each_screened_update_before_the_average_and_a_malformed_one_is_dropped_not_fatal"],
    "dp-clipping": ["test_strategy.py::test_client_side_clipping_applies_only_when_the_server_asks_for_it",
                    "test_simulation.py::test_client_side_dp_and_a_norm_bound_run_end_to_end"],
    "tracking": ["test_tracking.py::test_tracking_none_writes_nothing_and_tracking_dir_chooses_the_place",
                 "test_tracking.py::test_wandb_without_wandb_installed_says_so_in_one_line_and_tracks_nothing",
                 "test_simulation.py::test_main_job_trains_mops_across_clients_and_perplexity_falls"],
    "tracking-dir": ["test_tracking.py::test_tracking_none_writes_nothing_and_tracking_dir_chooses_the_place"],
}


def test_every_setting_has_a_test_of_its_effect():
    import ast
    from pathlib import Path

    assert set(EFFECTS) == set(Settings().to_flat()), "a setting without a test of its effect, or a test of a setting that is gone"
    here = Path(__file__).parent
    defined = {}
    for path in here.glob("test_*.py"):
        tree = ast.parse(path.read_text())
        defined[path.name] = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    missing = [test for tests in EFFECTS.values() for test in tests if test.split("::")[1] not in defined.get(test.split("::")[0], set())]
    assert not missing, f"named in EFFECTS but not defined: {missing}"

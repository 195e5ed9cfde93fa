"""Train: a form over ``TrainConfig`` with presets, the equivalent CLI command and REST request, and submit.

The form is generated from a list of dotted config paths, so labels, help texts and validation all come from
``vopd.config`` itself: a new knob there needs one line here, and the form can never disagree with the CLI.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Literal

import gradio as gr
from pydantic import BaseModel, ValidationError

from frontend import render, strings
from frontend.client import Job, VopdClient
from frontend.context import UiContext, readable_errors
from vopd.config import TrainConfig, config_to_cli, merge_settings, recipe, set_dotted

Widget = Literal["number", "int", "slider", "checkbox", "dropdown", "checkboxes"]


@dataclass(frozen=True)
class FieldSpec:
    path: str  # dotted TrainConfig path, e.g. "rollout.num_rollouts"
    label: str
    widget: Widget
    choices: tuple[str, ...] = ()
    low: float = 0.0
    high: float = 1.0
    step: float = 0.05
    zero_is_unset: bool = False  # a number box cannot be empty (Gradio shows None as 0): 0 leaves the field out


# Order is the form's order. Everything else stays at its default or comes from the "other fields" JSON.
FIELDS: tuple[FieldSpec, ...] = (
    FieldSpec("steps", "Steps (0 = give epochs)", "int", zero_is_unset=True),
    FieldSpec("epochs", "Epochs (0 = give steps)", "number", zero_is_unset=True),
    FieldSpec("batch_size", "Batch size (prompts)", "int"),
    FieldSpec("grad_accum", "Gradient accumulation", "int"),
    FieldSpec("lr", "Learning rate", "number"),
    FieldSpec("warmup_steps", "Warm-up steps", "int"),
    FieldSpec("seed", "Seed", "int"),
    FieldSpec("save_every", "Checkpoint every N steps", "int"),
    FieldSpec("rollout.num_rollouts", "Rollouts per prompt", "int"),
    FieldSpec("rollout.max_new_tokens", "Max new tokens per rollout", "int"),
    FieldSpec("rollout.temperature", "Rollout temperature", "number"),
    FieldSpec("rollout.engine", "Rollout engine", "dropdown", choices=("auto", "hf", "vllm")),
    FieldSpec("divergence.alpha", "Divergence alpha", "slider", low=0.0, high=1.0, step=0.05),
    FieldSpec("divergence.topk", "Divergence top-k (0 = full vocabulary)", "int"),
    FieldSpec("divergence.mode", "Loss mode", "dropdown", choices=("full_logits", "sampled_token")),
    FieldSpec(
        "teacher.mode", "Teacher", "dropdown", choices=("ema", "current", "fixed", "trust_region", "progressive")
    ),
    FieldSpec("teacher.ema_rate", "EMA rate", "number"),
    FieldSpec("freeze_vision_tower", "Freeze the vision encoder", "checkbox"),
    FieldSpec("vision_lr_scale", "Vision encoder LR scale (x learning rate)", "number"),
    FieldSpec("lora.enabled", "LoRA adapters", "checkbox"),
    FieldSpec("lora.rank", "LoRA rank", "int"),
    FieldSpec("runtime.device", "Device", "dropdown", choices=("auto", "cpu", "cuda", "mps")),
    FieldSpec("runtime.dtype", "Compute dtype", "dropdown", choices=("auto", "float32", "bfloat16", "float16")),
    FieldSpec("runtime.master_dtype", "Master weights dtype", "dropdown", choices=("float32", "compute")),
    FieldSpec("runtime.gradient_checkpointing", "Activation checkpointing", "checkbox"),
    FieldSpec("runtime.max_tokens_per_micro_batch", "Max tokens per forward (0 = no limit)", "int", zero_is_unset=True),
    FieldSpec("runtime.offload_optimizer", "Optimizer state on the host (CPU offload)", "checkbox"),
    FieldSpec("runtime.offload_teacher", "Teacher weights on the host (CPU offload)", "checkbox"),
    FieldSpec("runtime.offload_params", "Weight shards on the host (FSDP CPU offload)", "checkbox"),
    FieldSpec("report_to", "Also log to", "checkboxes", choices=("tensorboard", "mlflow", "wandb")),
)

# The run folder of the equivalent CLI command (the service picks its own for a submitted job): under
# $VOPD_HOME/runs, where the service lists CLI runs' models (``runs/studio-<hash>/final``), so a run made by the command
# shows up in the studio's model lists. The shell expands it as ``vopd.home.vopd_home`` resolves VOPD_HOME (unset or
# empty = ~/.vopd; a relative one from the working directory). The name is the config's hash: the same form gives the
# same folder (rerun it with --resume to continue), another form another folder.
CLI_HOME = '"${VOPD_HOME:-$HOME/.vopd}"'
CLI_RUN_PREFIX = "studio-"
_OUTPUT_PLACEHOLDER = "VOPD_STUDIO_OUTPUT"

# The recipes themselves live in vopd.config (shared with `vopd train --preset` and the REST body); here only labels.
# The first is the form's default: the recipe that shows a gain on held-out data on a CPU (docs/reproduction.md).
PRESETS: dict[str, str] = {
    strings.PRESET_TINY_WORLD: "tiny-world",
    strings.PRESET_TINY: "tiny-cpu",
    strings.PRESET_PAPER: "paper",
}

DEFAULT_PRESET = strings.PRESET_TINY_WORLD


# ----------------------------------------------------------------------------- pure callbacks
def _field_info(path: str) -> str | None:
    """The field's description from TrainConfig: the form's help text is the config's documentation."""
    model: type[BaseModel] = TrainConfig
    *parents, leaf = path.split(".")
    for part in parents:
        model = model.model_fields[part].annotation  # type: ignore[assignment]
    return model.model_fields[leaf].description


def _get_dotted(data: dict[str, Any], path: str) -> Any:
    """The value at a dotted path; None where the merged settings leave it out (the run length the recipe drops)."""
    node: Any = data
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def preset_values(preset: str) -> list[Any]:
    """The form's values for a recipe: the recipe over TrainConfig's defaults, merged as the CLI and API merge."""
    if preset not in PRESETS:
        raise render.UiInputError(f"unknown preset {preset!r}")
    defaults = TrainConfig.model_validate({"model": "m", "dataset": "d", "steps": 1}).model_dump(mode="json")
    defaults["steps"] = None  # the run length is the recipe's (steps or epochs)
    merged = merge_settings(defaults, recipe(PRESETS[preset]))
    return [_get_dotted(merged, spec.path) for spec in FIELDS]


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def config_from_form(model: str | None, dataset: str | None, values: list[Any], extra_json: str) -> TrainConfig:
    """A validated TrainConfig from the form; the 'other fields' JSON is merged over it."""
    if not model:
        raise render.UiInputError(strings.NEED_MODEL)
    if not dataset:
        raise render.UiInputError(strings.NEED_DATASET)
    data: dict[str, Any] = {"model": model, "dataset": dataset}
    for spec, value in zip(FIELDS, values, strict=True):
        if value is None or value == "" or (spec.zero_is_unset and value == 0):
            continue
        if spec.widget == "int":
            value = int(value)
        set_dotted(data, spec.path, value)
    if extra_json and extra_json.strip():
        try:
            extra = json.loads(extra_json)
        except json.JSONDecodeError as error:
            raise render.UiInputError(f"other fields: not valid JSON ({error.msg} at line {error.lineno})") from error
        if not isinstance(extra, dict):
            raise render.UiInputError('other fields: give a JSON object such as {"views": {"upscale": 3}}')
        data = _deep_merge(data, extra)
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as error:
        raise render.UiInputError(f"{strings.CONFIG_INVALID}: {render.validation_message(error)}") from error


def resources(config: TrainConfig, gpus: float | None = 1, nodes: float | None = 1) -> dict[str, int]:
    """The job's ``resources`` (devices per machine, machines), checked as the server checks them: the processes
    share each micro-batch's prompts, so batch_size must be a multiple of their number."""
    gpus, nodes = int(gpus or 1), int(nodes or 1)
    if not (1 <= gpus <= 64 and 1 <= nodes <= 64):
        raise render.UiInputError("devices per machine and machines are each between 1 and 64")
    if config.batch_size % (gpus * nodes):
        raise render.UiInputError(
            f"batch size {config.batch_size} must be a multiple of the {gpus * nodes} training processes "
            f"({gpus} per machine x {nodes} machines): they share each micro-batch's prompts"
        )
    return {"gpus": gpus, "nodes": nodes}


def request_body(config: TrainConfig, gpus: float | None = 1, nodes: float | None = 1) -> dict[str, Any]:
    """The POST /api/jobs body; ``output`` is the server's to choose, so it is left out; ``resources`` only when the
    job needs more than one device."""
    body: dict[str, Any] = {
        "kind": "train",
        "config": config.model_dump(mode="json", exclude_defaults=True, exclude={"output"}),
    }
    needs = resources(config, gpus, nodes)
    if needs != {"gpus": 1, "nodes": 1}:
        body["resources"] = needs if needs["nodes"] > 1 else {"gpus": needs["gpus"]}
    return body


def cli_run_name(config: TrainConfig) -> str:
    """The run folder's name under VOPD_HOME/runs: ``studio-`` and a short hash of the config (its output left out),
    stable across previews, so a command copied twice names the same run and the preview does not flicker."""
    settings = config.model_dump(mode="json", exclude_defaults=True, exclude={"output"})
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    return f"{CLI_RUN_PREFIX}{digest}"


def cli_output(config: TrainConfig) -> str:
    """The command's ``--output`` as the shell reads it: ``"${VOPD_HOME:-$HOME/.vopd}"/runs/NAME`` (the home quoted,
    so a VOPD_HOME holding spaces stays one argument; the name needs no quoting)."""
    return f"{CLI_HOME}/runs/{cli_run_name(config)}"


def equivalents(
    config: TrainConfig, api_base_url: str, gpus: float | None = 1, nodes: float | None = 1
) -> tuple[str, str]:
    """The same run as a ``vopd train`` command line and as a curl request against this server.

    The command runs as shown on the server's machine (in a POSIX shell): the CLI resolves the model and dataset
    names through VOPD_HOME as the API does, and the run folder (which the API chooses itself for a job) is
    ``cli_output(config)``, under VOPD_HOME/runs so the studio lists its models. Several devices add ``--nproc``; a
    job over several machines is the service's (node groups) or torchrun's on each machine."""
    request = request_body(config, gpus, nodes)
    needs = request.get("resources", {})
    body = json.dumps(request, indent=2)
    cli = config_to_cli(config.model_copy(update={"output": _OUTPUT_PLACEHOLDER}), "train")
    cli = cli.replace(f"--output {_OUTPUT_PLACEHOLDER}", f"--output {cli_output(config)}", 1)
    if needs.get("gpus", 1) > 1:
        cli += f" --nproc {needs['gpus']}"
    if needs.get("nodes", 1) > 1:
        cli = f"# {strings.MANY_MACHINES_CLI}\n{cli}"
    rest = (
        f"curl -X POST {api_base_url.rstrip('/')}/api/jobs \\\n"
        '  -H "Authorization: Bearer $VOPD_API_KEY" -H "Content-Type: application/json" \\\n'
        f"  -d '{body}'"
    )
    return cli, rest


def preview(
    model: str | None,
    dataset: str | None,
    values: list[Any],
    extra_json: str,
    api_base_url: str,
    gpus: float | None = 1,
    nodes: float | None = 1,
) -> tuple[str, str]:
    """Live preview: the equivalents, or the validation problem in their place."""
    try:
        config = config_from_form(model, dataset, values, extra_json)
        return equivalents(config, api_base_url, gpus, nodes)
    except render.UiInputError as error:
        return f"# {error}", f"# {error}"


def submit(
    client: VopdClient,
    model: str | None,
    dataset: str | None,
    values: list[Any],
    extra_json: str,
    gpus: float | None = 1,
    nodes: float | None = 1,
) -> Job:
    config = config_from_form(model, dataset, values, extra_json)
    body = request_body(config, gpus, nodes)
    return client.submit_job("train", body["config"], resources=body.get("resources"))


def plan(
    client: VopdClient,
    model: str | None,
    dataset: str | None,
    values: list[Any],
    extra_json: str,
    gpus: float | None = 1,
    nodes: float | None = 1,
    device_memory: str | None = None,
) -> str:
    """The job's memory plan as the server words it (its table), before the job is submitted."""
    config = config_from_form(model, dataset, values, extra_json)
    body = request_body(config, gpus, nodes)
    planned = client.plan_job(body["config"], resources=body.get("resources"), device_memory=device_memory or None)
    return planned.table


# ----------------------------------------------------------------------------- layout and wiring
@dataclass
class TrainTab:
    model: gr.Dropdown
    dataset: gr.Dropdown
    submit_button: gr.Button
    submitted_job: gr.State
    # The CLI/REST preview, for the model and dataset choices that arrive after the page loads: a choice set by the
    # server fires no change event here, so the preview read "Choose a dataset." beside a chosen dataset.
    refresh_preview: Any = None
    preview_inputs: list[Any] | None = None
    preview_outputs: list[Any] | None = None


def _widget(spec: FieldSpec, value: Any) -> gr.components.Component:
    common = {
        "label": spec.label,
        "info": _field_info(spec.path),
        "min_width": 180,
        "elem_id": "train-" + spec.path.replace(".", "-").replace("_", "-"),
    }
    if spec.widget == "checkbox":
        return gr.Checkbox(value=value, **common)
    if spec.widget == "checkboxes":
        return gr.CheckboxGroup(list(spec.choices), value=value or [], **common)
    if spec.widget == "dropdown":
        return gr.Dropdown(list(spec.choices), value=value, **common)
    if spec.widget == "slider":
        return gr.Slider(spec.low, spec.high, value=value, step=spec.step, **common)
    return gr.Number(value=value, precision=0 if spec.widget == "int" else None, **common)


def build_train_tab(ctx: UiContext) -> TrainTab:
    gr.Markdown(strings.TRAIN_INTRO)
    with gr.Row():
        preset = gr.Dropdown(list(PRESETS), value=DEFAULT_PRESET, label=strings.PRESET_LABEL, min_width=220)
        model = gr.Dropdown(label=strings.MODEL_LABEL, choices=[], min_width=220, elem_id="train-model")
        dataset = gr.Dropdown(label=strings.DATASET_LABEL, choices=[], min_width=220, elem_id="train-dataset")
    with gr.Row():
        gpus = gr.Number(
            1, precision=0, label=strings.GPUS_LABEL, info=strings.GPUS_INFO, min_width=220, elem_id="train-gpus"
        )
        nodes = gr.Number(
            1, precision=0, label=strings.NODES_LABEL, info=strings.NODES_INFO, min_width=220, elem_id="train-nodes"
        )
    initial = preset_values(DEFAULT_PRESET)
    widgets: list[gr.components.Component] = []
    per_row = 3
    for start in range(0, len(FIELDS), per_row):
        with gr.Row():
            widgets.extend(
                _widget(spec, value)
                for spec, value in zip(FIELDS[start : start + per_row], initial[start : start + per_row], strict=True)
            )
    extra = gr.Code("{}", language="json", label=strings.EXTRA_LABEL, lines=3)
    with gr.Row():
        device_memory = gr.Textbox(
            "", label=strings.DEVICE_MEMORY_LABEL, info=strings.DEVICE_MEMORY_INFO, min_width=220, max_lines=1
        )
        plan_button = gr.Button(strings.PLAN_TRAIN, elem_id="train-plan")
        submit_button = gr.Button(strings.SUBMIT_TRAIN, variant="primary", elem_id="train-submit")
    memory_plan = gr.Code(
        label=strings.PLAN_LABEL, lines=4, interactive=False, wrap_lines=True, elem_id="train-plan-out"
    )
    with gr.Row():
        cli = gr.Code(
            label=strings.CLI_LABEL,
            language="shell",
            lines=3,
            interactive=False,
            min_width=300,
            wrap_lines=True,
            elem_id="train-cli",
        )
        rest = gr.Code(
            label=strings.REST_LABEL, language="shell", lines=8, interactive=False, min_width=300, wrap_lines=True
        )
    submitted_job = gr.State(None)

    preset.change(preset_values, preset, widgets)

    def on_change(
        model_name: str | None,
        dataset_id: str | None,
        extra_json: str,
        gpu_count: float,
        node_count: float,
        *values: Any,
    ) -> tuple[str, str]:
        return preview(model_name, dataset_id, list(values), extra_json, ctx.api_base_url, gpu_count, node_count)

    form_inputs = [model, dataset, extra, gpus, nodes, *widgets]
    gr.on([component.change for component in form_inputs], on_change, form_inputs, [cli, rest])

    @readable_errors
    def on_submit(
        request: gr.Request,
        model_name: str | None,
        dataset_id: str | None,
        extra_json: str,
        gpu_count: float,
        node_count: float,
        *values: Any,
    ) -> int:
        job = submit(ctx.client(request), model_name, dataset_id, list(values), extra_json, gpu_count, node_count)
        gr.Info(f"Training job {job.id} queued.")
        return job.id

    submit_button.click(on_submit, [*form_inputs], submitted_job)

    @readable_errors
    def on_plan(
        request: gr.Request,
        memory: str,
        model_name: str | None,
        dataset_id: str | None,
        extra_json: str,
        gpu_count: float,
        node_count: float,
        *values: Any,
    ) -> str:
        return plan(
            ctx.client(request), model_name, dataset_id, list(values), extra_json, gpu_count, node_count, memory
        )

    plan_button.click(on_plan, [device_memory, *form_inputs], memory_plan)
    return TrainTab(
        model=model,
        dataset=dataset,
        submit_button=submit_button,
        submitted_job=submitted_job,
        refresh_preview=on_change,
        preview_inputs=form_inputs,
        preview_outputs=[cli, rest],
    )

"""Every user-facing sentence of the studio, apart from the layout code, so wording changes touch one file."""

from __future__ import annotations

TITLE = "Vision-OPD Studio"
SUBTITLE = (
    "On-policy self-distillation for fine detail: the **student** sees the full image with the evidence box drawn "
    "in red, the **teacher** (the same model) sees the crop of that box. Training pulls the student's per-token "
    "distributions toward the teacher's."
)
SIGNED_IN_AS = "Signed in as **{name}** · key `{prefix}…`{admin}"
ADMIN_BADGE = " · admin"
SIGN_OUT = "Sign out · switch key"  # the sign-in page then takes another key
NOT_SIGNED_IN = "Not signed in (or the key was revoked): reload the page to sign in with an API key."

# ----------------------------------------------------------------------------- sign-in page
SIGNIN_TITLE = "Sign in to Vision-OPD Studio"
SIGNIN_INTRO = "The studio acts with your API key: every key is an account, with its own jobs and datasets."
SIGNIN_KEY_LABEL = "API key"
SIGNIN_BUTTON = "Sign in"
SIGNIN_HELP = (
    "Where to find a key: <code>vopd serve</code> prints a one-time sign-in link and keeps the local key in "
    "<code>$VOPD_HOME/local_api_key</code>; <code>vopd apikey create --name you</code> makes a new one and "
    "<code>vopd apikey signin-link</code> prints a fresh link. The browser keeps a session, never the key."
)
SIGNIN_BAD_KEY = "That key is unknown or revoked."
SIGNIN_NO_KEY = "Paste an API key."
SIGNIN_KEY_IN_LINK = (
    "Links carrying a key are not accepted (the key would land in logs and browser history): paste the key here, "
    "or open the one-time link that vopd serve or vopd apikey signin-link prints."
)
SIGNIN_CODE_TITLE = "Sign in with this link?"
SIGNIN_CODE_INTRO = (
    "This one-time link signs this browser in to Vision-OPD Studio. Continue only if you opened a link that you "
    "made yourself (vopd serve or vopd apikey signin-link print one): a link from someone else would sign you in "
    "to their account, and what you upload or train there would be theirs."
)
SIGNIN_CODE_BUTTON = "Sign in"
SIGNIN_BAD_CODE = "This sign-in link is unknown, already used or expired: run vopd apikey signin-link for a new one."
SIGNOUT_TITLE = "Sign out of Vision-OPD Studio?"
SIGNOUT_INTRO = "Signing out ends this browser's session on the server; the key itself stays valid."
SIGNOUT_BUTTON = "Sign out"
SIGNED_OUT = "Signed out. Paste a key to sign in again, with this key or another one."

# ----------------------------------------------------------------------------- tabs
TAB_INSPECT = "Inspect"
TAB_DATASETS = "Datasets"
TAB_TRAIN = "Train"
TAB_JOBS = "Jobs"
TAB_EVALUATE = "Evaluate"
TAB_DEMO = "Demo"

# ----------------------------------------------------------------------------- shared
MODEL_LABEL = "Model or checkpoint"
MODEL_INFO = (
    "Base models, trained models (job-N/final), checkpoints (job-N/step-M) and runs trained with the CLI under "
    "$VOPD_HOME/runs (runs/NAME/final)."
)
DATASET_LABEL = "Dataset"
REFRESH = "↻ Refresh"
NO_MODELS = "no models yet: the server registers the tiny model on first start"
QUESTION_LABEL = "Question"
OPTIONS_LABEL = "Options (one per line or comma-separated; leave empty for open questions)"
MAX_NEW_TOKENS_LABEL = "Max new tokens"

# ----------------------------------------------------------------------------- inspect
INSPECT_INTRO = (
    "Upload an image (or load a dataset sample), draw the evidence box on it or type its corners, ask a question "
    "and run: the student's answer appears as tokens coloured by how much the teacher disagrees at each position. "
    "Click a token to compare both top-k distributions."
)
SOURCE_LABEL = "Image source"
SOURCE_UPLOAD = "Upload"
SOURCE_SAMPLE = "Dataset sample"
ANNOTATOR_LABEL = "Image — drag to draw the evidence box (drag inside it to move it, a corner to resize it)"
UPLOAD_IMAGE = "Upload an image…"
DRAWING_EMPTY = "Upload an image (the button above), then drag on it to draw the evidence box."
FIND_EVIDENCE_LABEL = "No box: let the model find the evidence"
FIND_EVIDENCE_INFO = (
    "The box is left out of the request: the model searches the image for the evidence itself, and the crop it chose "
    "is drawn dashed on the image with its confidence."
)
EVIDENCE_GIVEN = "the given box"
EVIDENCE_SEARCH = "the model's own evidence crop"
EVIDENCE_CONFIDENCE = "confidence"
EVIDENCE_LINE = "Evidence: {label}, at [{box}] (pixels of the original image)."
SAMPLE_INDEX_LABEL = "Sample index"
LOAD_SAMPLE = "Load sample"
BOX_LABELS = ("x0", "y0", "x1", "y1")
BOX_INFO = "Evidence box in pixels of the original image; x1 > x0 and y1 > y0."
STUDENT_VIEW_LABEL = "Student view (full image, red box)"
TEACHER_VIEW_LABEL = "Teacher view (the crop, upscaled)"
COMPARE_MODEL_LABEL = "Compare with (optional)"
COMPARE_MODEL_INFO = "A second model or checkpoint run on the same image, e.g. before vs after training."
METRIC_LABEL = "Colour tokens by"
SCALE_LABEL = "Colour scale"
SCALE_ABSOLUTE = "absolute (fixed range)"
SCALE_RELATIVE = "relative to this answer"
MOST_DIVERGENT = "The most divergent token by {metric} (click another token in the strip to see it)."
METRIC_JSD = "JSD(alpha)"
METRIC_REVERSE = "reverse KL"
METRIC_FORWARD = "forward KL"
ALPHA_LABEL = "alpha (0 = forward KL, 1 = reverse KL, 0.5 = JSD)"
GREEDY_LABEL = "Greedy rollout"
TOPK_LABEL = "Top-k shown per token"
RUN_INSPECT = "Run inspect"
TOKEN_STRIP_LABEL = "Student's rollout, coloured by per-token divergence (click a token)"
COMPARE_STRIP_LABEL = "Second model's rollout"
STUDENT_ANSWER_LABEL = "Student's answer (full image)"
TEACHER_ANSWER_LABEL = "Teacher's answer (crop)"
STUDENT_TOPK_LABEL = "Student top-k"
TEACHER_TOPK_LABEL = "Teacher top-k"
TOPK_COLUMNS = ["#", "token", "p", "Δ log p", "note"]
TOPK_COLUMN_HELP = (
    "rank of the token in this side's top-k",
    "the token as decoded; unprintable bytes and parts of a multi-byte character show as <0xNN>",
    "this side's probability of the token",
    "log p(this side) − log p(other side) for the same token: above 0 this side is surer of it, below 0 less sure "
    "(blank when the other side does not list it)",
    "the (tail) row is the probability outside the top-k",
)
TOPK_TAIL = "(tail)"
TOPK_TAIL_NOTE = "mass outside the top-k"
TOPK_NOT_LISTED = "not in the other's top-k"
SELECT_TOKEN_HINT = "Click a token in the strip to see both distributions at that position."
NEED_IMAGE = "Upload an image first (or switch the source to a dataset sample)."
NEED_QUESTION = "Type a question."
MISSING = "Missing: {items}."
MISSING_IMAGE = "an image (press Upload image, or switch the source to a dataset sample)"
MISSING_SAMPLE = "a dataset sample (choose a dataset and press Load sample)"
MISSING_QUESTION = "a question (type it in the Question box)"
MISSING_MODEL = "a model (choose one in Model)"
NEED_MODEL = "Choose a model."
NEED_DATASET = "Choose a dataset."
NO_TOKENS = "The student produced no tokens (empty answer)."
LETTER_FOR_OPEN_QUESTION = (
    "(a bare letter, though no options were given: this model was trained on multiple-choice questions only; give "
    "options, or ask a model trained on open questions)"
)

# ----------------------------------------------------------------------------- train
TRAIN_INTRO = (
    "A form over the training config (`vopd.config.TrainConfig`). Start from a preset, adjust, and submit: the job "
    "is queued and opens in the Jobs tab. The same config runs from the CLI or as REST JSON (shown below). The "
    "default (tiny world on `synth-train`) raised full-image accuracy on the held-out set `synth-heldout` from 66% "
    "to about 77% in docs/reproduction.md; when it finishes, the job page compares base and trained there."
)
PRESET_LABEL = "Preset"
PRESET_TINY = "Smoke test on CPU (20 steps; too short to show a gain)"
PRESET_TINY_WORLD = "Tiny world: shows the effect on held-out data (CPU, 300 steps, ~4-8 min)"
PRESET_PAPER = "Paper: the official run (GPU)"
APPLY_PRESET = "Apply preset"
EXTRA_LABEL = 'Other fields (JSON, merged over the form; e.g. {"views": {"upscale": 3}})'
CLI_LABEL = "Equivalent CLI command"
GPUS_LABEL = "Devices per machine"
GPUS_INFO = "Training processes (GPUs) on each machine; more than one means DDP unless the config says FSDP."
NODES_LABEL = "Machines"
NODES_INFO = "More than one needs a node group of workers (vopd worker --nodes N ...); see docs/scaling.md."
MANY_MACHINES_CLI = (
    "over several machines: submit the job to a node group, or start this with torchrun's rendezvous arguments on "
    "each machine (docs/scaling.md)"
)
REST_LABEL = "Equivalent REST request"
SUBMIT_TRAIN = "Submit training job"
PLAN_TRAIN = "Plan memory"
PLAN_LABEL = "Memory plan per device (read from the model's config.json; nothing is loaded or queued)"
DEVICE_MEMORY_LABEL = "Memory per device"
DEVICE_MEMORY_INFO = "e.g. 80GiB or 141GB; empty: the API host's GPU, else its memory"
CONFIG_INVALID = "The config is not valid"

# ----------------------------------------------------------------------------- jobs
JOBS_INTRO = "Queue and history of your jobs; select a row (or type an id) to follow a job live."
STATUS_FILTER = "Status"
KIND_FILTER = "Kind"
ANY = "any"
JOB_ID_LABEL = "Job id"
OPEN_JOB = "Open job"
JOB_TABLE_COLUMNS = ["id", "kind", "status", "progress", "step", "queue pos.", "ETA", "model", "dataset", "created"]
CANCEL = "Cancel"
RESUME = "Resume"
LOG_LABEL = "Log (newest line first)"
LOSS_PLOT = "Loss"
DIVERGENCE_PLOT = "Divergence"
AGREEMENT_PLOT = "Argmax agreement"
ACCURACY_PLOT = "Accuracy (evaluations of this job's checkpoints)"
ACCURACY_EMPTY = (
    "No accuracy yet: it is measured by evaluating a checkpoint, not during training. When a checkpoint is saved, "
    "run an evaluation of it in the **Evaluate** tab (model `job-N/step-M` or `job-N/final`); its full-image and crop "
    "accuracy then appear here at that step."
)
COMPARE_BASE = "Compare base vs trained on held-out data"
COMPARE_OFFER = (
    "Training finished. **Compare base vs trained on held-out data** evaluates the starting model and the trained "
    "one on a set this job never read (`synth-heldout` by default), and shows both here."
)
COMPARE_TITLE = "#### Base vs trained on `{dataset}` (not trained on)"
COMPARE_GAIN = "**Full image: {points:+.1f} points** ({before:.1%} → {after:.1%})."
COMPARE_NEEDS_SUCCESS = "Job {id} is {status}: base and trained can be compared once training has succeeded."
COMPARE_SUBMITTED = "Evaluations {ids} queued (base, then trained); the comparison fills in below as they finish."
NO_HELD_OUT = (
    "No dataset other than the training set `{dataset}` is registered: upload one the job did not train on (or "
    "restart `vopd serve`, which registers `synth-heldout`)."
)
ACCURACY_EMPTY_EVAL = "An evaluation job: its accuracy is in the header above and in the Evaluate tab."
ARTIFACTS_LABEL = "Artifacts"
ARTIFACT_COLUMNS = ["name", "kind", "size", "use as model"]
ARTIFACT_PICK = "Artifact"
DOWNLOAD = "Fetch for download"
NO_JOB = (
    "No job selected: click a row of the table above (or type its id and press **Open job**). No jobs yet? Submit "
    "one in the **Train** or **Evaluate** tab; it opens here."
)
NEED_JOB = "Open a job first: click a row of the jobs table."
CANCEL_SENT = "Cancellation requested for job {id}: a running job stops after its next step."
RESUMED = "Job {id} queued again; training continues from its newest checkpoint."

# ----------------------------------------------------------------------------- evaluate
EVAL_INTRO = (
    "Accuracy on the full image (student view) and on the crop (teacher view): the gap is what Vision-OPD closes. "
    "Run one evaluation per model (e.g. the base model and a trained one) or pick finished evaluations to compare."
)
EVAL_MODELS_LABEL = "Models to evaluate"
EVAL_ENGINE_LABEL = "Answer engine"
EVAL_ENGINE_INFO = (
    "What decodes the answers: hf = transformers (the CPU default); vllm = vLLM on a GPU worker that has it; "
    "auto = vllm where the worker can, else hf. The table shows what the worker chose."
)
EVAL_LIMIT_LABEL = "Only the first N samples (0 = all)"
FULL_VIEW_LABEL = "Full-image condition"
RUN_EVAL = "Run evaluation"
EVAL_JOBS_LABEL = "Evaluation jobs to compare"
COMPARE = "Compare"
EVAL_TABLE_COLUMNS = ["job", "model", "dataset", "status", "engine", "full-image acc.", "crop acc.", "gap", "n"]
ITEMS_JOB_LABEL = "Per-item records of"
LOAD_ITEMS = "Load items"
ITEM_COLUMNS = ["#", "id", "question", "answer", "student", "✓ student", "teacher", "✓ teacher"]
EVAL_CHART_LABEL = "Accuracy: base models first, then trained ones"
EVAL_X_TITLE = "model (evaluation job) · condition"
EVAL_Y_TITLE = "accuracy"
EVAL_COLOR_TITLE = "condition"
CONDITION_MEANING = {
    "full image": "the student's view: the whole image",
    "crop": "the teacher's view: the crop of the evidence box",
}
EVAL_EMPTY = (
    "No evaluation to show yet: choose models and a dataset above and press **Run evaluation** (or pick finished "
    "evaluation jobs and press **Compare**)."
)
EVAL_RUNNING = "Evaluating: the bars appear here when the evaluation finishes (a few seconds per sample on a CPU)."
EVAL_TRAINED_ON = (
    "⚠ {models} trained on `{dataset}`: accuracy on data a model trained on overstates it. Evaluate on a dataset it "
    "did not see: `synth-heldout` is registered for that (another synth seed, never trained on by default)."
)
EVAL_SUBMITTED = "Queued evaluation job(s) {ids}; they refresh here while they run."
NO_RECORDS = "Job {id} has no per-item records (yet)."

# ----------------------------------------------------------------------------- demo
DEMO_INTRO = (
    "Fine-detail question answering: click an example (or upload an image), ask, and read the chosen model's answer. "
    "No box is needed: without one the model sees the plain full image, as at inference, and the image below the "
    "answer shows where it looked. Once you have trained a model of the chosen base, base and trained answer side by "
    "side."
)
DEMO_LOOKED_LABEL = "Where the model looked"
DEMO_LOOKED = "Dashed box: {label}, at [{box}]."
DEMO_IMAGE_LABEL = "Image"
# The sample question names no box (the model sees the plain image, as at inference) and has one right answer on a
# picture of twenty shapes: the box-free world's question (vopd.synth), whose target is its only black object. ("What
# color is the small shape?" fitted many shapes at once.) The Demo's model is that world's base when offered.
DEMO_QUESTION = "What shape is the black object?"
DEMO_OPTIONS = "circle, square, triangle, diamond"
DEMO_MODEL = "tiny-nobox"
DEMO_EXAMPLES_LABEL = "Examples: click one (held-out synthetic items, each with one right answer)"
DEMO_BOX_LABEL = "Evidence box x0, y0, x1, y1 (optional)"
DEMO_BOX_INFO = "Empty: the model sees the plain image and finds its own evidence. Given: drawn in red, as in training."
DEMO_TRAINED_LABEL = "Compare with a trained model"
DEMO_TRAINED_INFO = "Filled with your newest trained model of the chosen base; clear it to ask the base alone."
DEMO_BASE_TITLE = "**Base** · `{model}`"
DEMO_TRAINED_TITLE = "**Trained** · `{model}`"
DEMO_RIGHT = " · ✓ right"
DEMO_WRONG = " · ✗ the right answer is **{answer}**"
DEMO_MODEL_MISSING = "This example fits `{model}`, which this server does not offer; the model was left as it was."
ASK = "Ask"
ANSWER_LABEL = "Answer"

# ----------------------------------------------------------------------------- datasets
DATASETS_INTRO = (
    "Your datasets and the shared ones, by name. **Upload** a `.zip` (`data.jsonl` beside the images it names, or "
    "the Parquet files of a dataset in the official layout), a `.jsonl` whose images are base64 (`image_base64`), "
    "a `.parquet` file, or a `.jsonl` together with its image files (select them all). The server checks every "
    "line and names each problem. Or **make a synthetic set**, as `vopd synth` does, without a terminal."
)
UPLOAD_TITLE = "#### Upload"
UPLOAD_FILES_LABEL = "Dataset file(s)"
UPLOAD_NAME_LABEL = "Name (optional; default: the file's name)"
UPLOAD_BUTTON = "Upload and check"
UPLOAD_NEED_FILE = "Choose a file to upload first."
UPLOAD_BUNDLE_NEEDS_JSONL = (
    "Several files make one dataset only as one .jsonl with its images (.png, .jpg, ...): got {names}. Upload a "
    ".zip, .jsonl or .parquet file on its own."
)
UPLOADED = "Uploaded **{name}**: {n:,} samples ({size}). It is listed below and in every tab's dataset list."
UPLOAD_REJECTED = "**The server refused the dataset:** {message}"
UPLOAD_MORE_ISSUES = "… and {n} more."
UPLOAD_IMAGES_HINT = (
    "A `.jsonl` sent alone carries only `image_base64` images: pick its image files together with it (or zip the "
    "folder) so that the paths its lines name are found."
)
SYNTH_TITLE = "#### Make a synthetic set"
SYNTH_N_LABEL = "Size (items)"
SYNTH_SEED_LABEL = "Seed"
SYNTH_WORLD_LABEL = "World"
SYNTH_WITH_BOX = "With evidence box"
SYNTH_NO_BOX = "No box (the model finds the evidence)"
SYNTH_NAME_LABEL = "Name (optional)"
SYNTH_BUTTON = "Make synthetic set"
SYNTH_HELP = (
    "The same generator as `vopd synth --n N --seed S [--no-box]`: the same seed gives the same items. Sets are built "
    "on the server within seconds (at most a couple of thousand items; larger ones with the CLI and an upload)."
)
SYNTH_DONE = "Made **{name}**: {n:,} items ({size})."
SYNTH_NEED_N = "Give the number of items (a whole number of at least 1)."
SYNTH_NEED_SEED = "Give a seed (a whole number of at least 0)."
DATASET_TABLE_COLUMNS = ["name", "samples", "size", "owner", "id (config.dataset)"]
OWNER_YOURS = "yours"
OWNER_SHARED = "shared"
PREVIEW_TITLE = "#### Preview"
PREVIEW_DATASET_LABEL = "Dataset to preview"
PREVIEW_BUTTON = "Preview samples"
PREVIEW_COUNT = 6
PREVIEW_GALLERY_LABEL = "Samples"
PREVIEW_NOTE = (
    "The red box is drawn as the student sees it in training; a set without boxes shows, dashed blue, the box it "
    "keeps for evaluation only."
)
PREVIEW_NEED_DATASET = "Choose a dataset to preview."
PREVIEW_HEADER = "**{name}**: samples {first}-{last} of {total:,}"
PREVIEW_ITEM = "- **#{index}** `{id}`: {question}  \n  options: {options} · answer: **{answer}** · box: {box}"
PREVIEW_HIDDEN_LABEL = "target (hidden)"
PREVIEW_NO_BOX = "none (searched)"

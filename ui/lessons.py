"""Lessons that ask before they tell: the Lessons tab and `/lesson`.

Each step asks the learner to predict (a choice), then runs the live model
(`generation.inside.lessons`) and shows what it did. Progress lives in the browser session
(`gr.State`): no accounts, nothing kept on the server but the model's answers, which are the same
for everyone and computed once per step.
"""

from __future__ import annotations

import csv
import io
import threading
from dataclasses import dataclass
from typing import Any

import gradio as gr

from attention.plot import csv_cell
from generation.inside import LESSONS, FullPrecisionCache, Lesson, Reveal, get_lesson, run_step

from .common import INSPECT_EVENTS, PRIVATE, REDRAW, DownloadDir, ModelSlot, as_int, as_text, download_buttons, error_text
from .common import quote, ready_button, typed_api

LESSONS_HELP = """
## Lessons
Short guided lessons on the live model. Each step asks you to **predict** first; then the model
runs and shows what it really does. Your answers stay in this browser tab.
"""


def new_progress(key: str = LESSONS[0].key) -> dict[str, Any]:
    """A session's place in the lessons: the lesson, the step, and every prediction checked so far."""
    return {"lesson": key, "step": 0, "answers": {}}


def score_line(progress: dict[str, Any]) -> str:
    answers = progress["answers"]
    if not answers:
        return "*No predictions checked yet.*"
    right = sum(answers.values())
    return f"Your predictions so far: **{right} of {len(answers)}** matched the model."


def reveal_markdown(les: Lesson, step: int, picked: int, rev: Reveal) -> str:
    choices = les.steps[step].choices
    verdict = (f"✓ You predicted *{choices[picked]}*, and so does the model." if picked == rev.answer else
               f"✗ You predicted *{choices[picked]}*; the model: **{choices[rev.answer]}**.")
    return f"{verdict}\n\n{rev.explanation}"


def lesson_csv(rev: Reveal) -> str:
    """A step's figures as CSV: the table's headers, then its rows (text cells through `csv_cell`)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(rev.headers)
    w.writerows([csv_cell(c) if isinstance(c, str) else c for c in row] for row in rev.rows)
    return buf.getvalue()


class LessonsHandlers:
    """The lessons' handlers over the shared model; each step's answer is computed once per model."""

    def __init__(self, model: ModelSlot, full_precision: FullPrecisionCache) -> None:
        self.model = model
        self.full_precision = full_precision
        self._reveals: dict[tuple[str, str, int], Reveal] = {}  # bounded: one per step of LESSONS
        self._lock = threading.Lock()
        self.files = DownloadDir()

    def reveal(self, key: str, step: int, progress: Any = None) -> Reveal:
        """The live model's answer to a step (ValueError / gr.Error when it cannot run)."""
        lm = self.model.require()
        cache_key = (f"{lm.model_id}:{getattr(lm, 'rounding', '')}", key, step)
        found = self._reveals.get(cache_key)
        if found is not None:
            return found

        def full() -> Any:
            if progress is not None and not self.full_precision.loaded():
                progress(0.3, desc="Loading the full-precision copy (first time only) …")
            return self.full_precision.get(self.model.settings)

        with self._lock:  # thirty students on the same step: one of them runs it, the rest read it
            found = self._reveals.get(cache_key)
            if found is None:
                found = self._reveals[cache_key] = run_step(lm, key, step, full)
        return found

    @staticmethod
    def step_outputs(progress: dict[str, Any]) -> tuple:
        """Widgets for the step `progress` points at, before its reveal."""
        les = get_lesson(progress["lesson"])
        step = progress["step"]
        head = f"### {les.title}\n{les.intro}\n\n**Step {step + 1} of {len(les.steps)}**"
        return (head, les.steps[step].question,
                gr.Radio(choices=list(les.steps[step].choices), value=None, interactive=True),
                "", gr.Dataframe(visible=False), gr.DownloadButton(value=None, interactive=False),
                gr.Button(interactive=True), gr.Button(interactive=False), progress, score_line(progress))

    def pick(self, key: str, progress: dict[str, Any] | None) -> tuple:
        """UI: start a lesson (its first step); the session keeps its earlier answers."""
        progress = {**(progress or new_progress()), "lesson": get_lesson(key).key, "step": 0}
        return self.step_outputs(progress)

    def check(self, progress: dict[str, Any], choice: str | None, progress_bar: gr.Progress = gr.Progress()) -> tuple:
        """UI: the learner's prediction against the live model."""
        les, step = get_lesson(progress["lesson"]), progress["step"]
        choices = les.steps[step].choices
        if choice not in choices:
            gr.Warning("Pick your prediction first: the lesson asks before it tells.", title="Lessons")
            return (gr.skip(),) * 8
        try:
            rev = self.reveal(les.key, step, progress_bar)
        except (ValueError, gr.Error) as exc:
            gr.Warning(error_text(exc), title="Lessons")
            return (gr.skip(),) * 8
        picked = choices.index(choice)
        answers = {**progress["answers"], f"{les.key}:{step}": picked == rev.answer}
        progress = {**progress, "answers": answers}
        last = step + 1 == len(les.steps) and les.key == LESSONS[-1].key
        (path,) = self.files.write({f"lesson_{les.key}_step{step + 1}.csv": lesson_csv(rev)})
        return (reveal_markdown(les, step, picked, rev),
                gr.Dataframe(value=rev.rows, headers=list(rev.headers), visible=True), ready_button(path),
                gr.Radio(interactive=False), gr.Button(interactive=False),
                gr.Button(interactive=not last, value="Next step" if step + 1 < len(les.steps) else "Next lesson"),
                progress, score_line(progress))

    def next_step(self, progress: dict[str, Any]) -> tuple:
        """UI: the next step, or the next lesson's first one after the last step."""
        les, step = get_lesson(progress["lesson"]), progress["step"]
        if step + 1 < len(les.steps):
            progress = {**progress, "step": step + 1}
        else:
            after = [x.key for x in LESSONS].index(les.key) + 1
            progress = {**progress, "lesson": LESSONS[min(after, len(LESSONS) - 1)].key, "step": 0}
        return (gr.Radio(value=progress["lesson"]), *self.step_outputs(progress))

    def lesson_api(self, lesson: str = LESSONS[0].key, step: int = 0, prediction: str = "") -> dict:
        """API /lesson: one step of a lesson. Without a prediction, the question only: {"lesson",
        "title", "step", "steps", "question", "choices"}. With a prediction (one of the choices, as
        written), the live model's answer too: "prediction", "answer" (the choice the model's
        behaviour matches), "correct", "explanation" (markdown), "headers" and "rows" (the figures).
        Lessons: heads, temperature, four_bit, induction; steps count from 0."""
        les = get_lesson(as_text(lesson, "lesson"))
        step = as_int(step, "step", 0, len(les.steps) - 1)
        prediction = as_text(prediction, "prediction", none_ok=True, max_chars=200)
        s = les.steps[step]
        out: dict[str, Any] = {"lesson": les.key, "title": les.title, "step": step, "steps": len(les.steps),
                               "question": s.question, "choices": list(s.choices)}
        if not prediction:
            return out
        if prediction not in s.choices:
            raise ValueError(f"prediction must be one of the step's choices {list(s.choices)}, got {quote(prediction)}")
        rev = self.reveal(les.key, step)
        return {**out, "prediction": prediction, "answer": s.choices[rev.answer],
                "correct": s.choices.index(prediction) == rev.answer, "explanation": rev.explanation,
                "headers": list(rev.headers), "rows": rev.rows}


@dataclass
class LessonsView:
    pick: gr.Radio
    choice: gr.Radio
    check: gr.Button
    next: gr.Button


def build_lessons(demo: gr.Blocks, handlers: LessonsHandlers) -> LessonsView:
    """The Lessons tab's contents (in the current Tab) and `/lesson`."""
    first = new_progress()
    les = get_lesson(first["lesson"])
    gr.Markdown(LESSONS_HELP)
    pick = gr.Radio([(x.title, x.key) for x in LESSONS], value=les.key, label="Lesson", elem_id="lesson-pick")
    head = gr.Markdown(f"### {les.title}\n{les.intro}\n\n**Step 1 of {len(les.steps)}**", elem_id="lesson-head")
    question = gr.Markdown(les.steps[0].question, elem_id="lesson-question")
    choice = gr.Radio(list(les.steps[0].choices), value=None, label="Your prediction", elem_id="lesson-choice")
    with gr.Row():
        check = gr.Button("Check with the live model", variant="primary", elem_id="lesson-check")
        nxt = gr.Button("Next step", interactive=False, elem_id="lesson-next")
    reveal = gr.Markdown(elem_id="lesson-reveal")
    evidence = gr.Dataframe(visible=False, interactive=False, show_label=False, elem_id="lesson-evidence")
    with gr.Row():
        (table_csv,) = download_buttons("lesson", [("Table CSV", "csv")], alone=True)
    score = gr.Markdown(score_line(first), elem_id="lesson-score")
    progress = gr.State(first)

    step_widgets = [head, question, choice, reveal, evidence, table_csv, check, nxt, progress, score]
    pick.input(handlers.pick, [pick, progress], step_widgets, queue=False, **REDRAW, **PRIVATE)
    check.click(handlers.check, [progress, choice], [reveal, evidence, table_csv, choice, check, nxt, progress, score],
                **INSPECT_EVENTS, **PRIVATE)
    nxt.click(handlers.next_step, [progress], [pick, *step_widgets], queue=False, **PRIVATE)
    gr.api(typed_api(handlers.lesson_api), api_name="lesson", **INSPECT_EVENTS)
    return LessonsView(pick=pick, choice=choice, check=check, next=nxt)

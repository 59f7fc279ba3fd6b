"""Progress: a bar on a terminal only; elsewhere one plain line every interval, with step, loss, tokens/s, ETA."""
import io

from are_fast.training.progress import Progress


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_off_a_terminal_it_prints_plain_lines_with_eta():
    stream = io.StringIO()
    progress = Progress(4, "stage1", interval_s=0.0, stream=stream)
    for step in range(4):
        progress.update(loss=1.0 / (step + 1), tokens_per_s=1234.5)
    progress.write("eval at step 4: eval_loss 0.1000")
    progress.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 5 and "\r" not in stream.getvalue()  # no bar redraws
    assert lines[0].startswith("stage1: step 1/4 (25%) | loss 1.0000 | tokens/s 1234 |") and "ETA" in lines[0]
    assert lines[3].startswith("stage1: step 4/4 (100%) | loss 0.2500") and "ETA" not in lines[3]
    assert lines[4] == "eval at step 4: eval_loss 0.1000"


def test_lines_are_rate_limited_and_the_last_state_is_printed_once():
    stream = io.StringIO()
    progress = Progress(100, "stage2", interval_s=3600.0, stream=stream, initial=10)
    for _ in range(90):
        progress.update(loss=0.5)
    progress.close()
    progress_lines = stream.getvalue().splitlines()
    assert progress_lines == [progress.line()] and progress_lines[0].startswith("stage2: step 100/100 (100%)")


def test_a_bar_on_a_terminal_and_nothing_when_disabled():
    terminal = _Terminal()
    progress = Progress(3, "pretrain", interval_s=0.0, stream=terminal)
    for _ in range(3):
        progress.update(loss=2.0)
    progress.close()
    assert "pretrain" in terminal.getvalue() and "\r" in terminal.getvalue()  # tqdm's redraws
    quiet = io.StringIO()
    progress = Progress(3, "pretrain", enabled=False, interval_s=0.0, stream=quiet)
    progress.update(loss=2.0)
    progress.write("eval")
    progress.close()
    assert quiet.getvalue() == ""

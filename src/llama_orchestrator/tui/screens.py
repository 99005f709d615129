"""The dashboard's secondary screens: an instance's detail (Enter), its log (L), and the confirmation of a stop
(D) or restart (Ctrl+R).

Each screen loads its data in thread workers (``tui.data`` blocks) and renders what the worker posts back.
"""

from __future__ import annotations

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, VerticalScroll
from textual.message import Message
from textual.screen import ModalScreen, Screen
from textual.widgets import Button, Footer, Header, Label, RichLog, Static

from llama_orchestrator.cli.render import HEALTH_STYLE
from llama_orchestrator.tui.data import STYLE, Backend, Detail, LogFeed


class DetailScreen(Screen[None]):
    """Config, runtime state, health (last check, latency, history) and the last log lines of one instance."""

    BINDINGS = [
        Binding("escape,q", "app.pop_screen", "Back", key_display="Esc"),
        Binding("l", "logs", "Logs"),
        Binding("r", "reload", "Refresh"),
    ]

    class Loaded(Message):
        def __init__(self, detail: Detail | None, error: str | None = None) -> None:
            super().__init__()
            self.detail, self.error = detail, error

    def __init__(self, backend: Backend, name: str, refresh_s: float = 1.0) -> None:
        super().__init__()
        self.backend, self.instance, self.refresh_s = backend, name, refresh_s
        self.detail: Detail | None = None
        self._loading = False

    def compose(self) -> ComposeResult:
        yield Header()
        with VerticalScroll(id="detail-scroll"):
            yield Static(f"loading {self.instance}…", id="detail")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = f"{self.instance}: detail"
        self.action_reload()
        self.set_interval(self.refresh_s, self.action_reload)

    def action_reload(self) -> None:
        if not self._loading:
            self._loading = True
            self._load()

    @work(thread=True, exit_on_error=False, group="detail")
    def _load(self) -> None:
        try:
            self.post_message(self.Loaded(self.backend.detail(self.instance)))
        except Exception as exc:  # noqa: BLE001 - shown on the screen instead of ending the app
            self.post_message(self.Loaded(None, str(exc)))

    @on(Loaded)
    def _show(self, message: Loaded) -> None:
        self._loading = False
        widget = self.query_one("#detail", Static)
        if message.detail is None:
            widget.update(Text(f"{self.instance}: {message.error}", style="red"))
            return
        self.detail = message.detail
        widget.update(render_detail(message.detail))

    def action_logs(self) -> None:
        self.app.push_screen(LogScreen(self.backend, self.instance))


def _pairs(title: str, pairs: tuple[tuple[str, str], ...], coloured: str, styles: dict[str, str]) -> Table:
    """A two-column key/value table; the value of the ``coloured`` key gets its colour from ``styles``."""
    table = Table(title=title, title_justify="left", title_style="bold", show_header=False, box=None, pad_edge=False)
    table.add_column(style="dim", no_wrap=True)
    table.add_column()
    for key, value in pairs:
        style = styles.get(value.split(" ")[0], "") if key == coloured else ""
        table.add_row(key, Text(value, style=style))
    return table


def _lines(title: str, lines: tuple[str, ...]) -> Group:
    body = Text("\n".join(lines), no_wrap=True, overflow="ellipsis") if lines else Text("(empty)", style="dim")
    return Group(Text(title, style="bold"), body, Text(""))


def render_detail(detail: Detail) -> Group:
    """Runtime, health, its history and the last log lines (cut at the column's width; L shows them whole) beside
    the config."""
    history = Text(no_wrap=True, overflow="ellipsis")
    for event in detail.history:
        history.append(f"{event.time}  ")
        history.append(f"{event.kind:<12} ", style=event.style)
        history.append(f"{event.message}\n")
    left = Group(
        _pairs("Runtime", detail.runtime, "status", STYLE),
        Text(""),
        _pairs("Health", detail.health, "health", HEALTH_STYLE),
        Text(""),
        Text("Health history", style="bold"),
        history if detail.history else Text("(no health events yet)", style="dim"),
        Text(""),
        _lines("Last lines of stderr", detail.stderr),
        _lines("Last lines of stdout", detail.stdout),
    )
    right = Group(Text("Config", style="bold"), Text(detail.config))
    grid = Table.grid(padding=(0, 3), expand=True)
    grid.add_column(ratio=3)
    grid.add_column(ratio=2)
    grid.add_row(left, right)
    return Group(Text(detail.name, style="bold"), grid)


class LogScreen(Screen[None]):
    """The last lines of an instance's stdout and stderr, then every new line as it is written."""

    BINDINGS = [
        Binding("escape,q", "app.pop_screen", "Back", key_display="Esc"),
    ]

    class Lines(Message):
        def __init__(self, lines: list[str]) -> None:
            super().__init__()
            self.lines = lines

    def __init__(self, backend: Backend, name: str, poll_s: float = 0.3) -> None:
        super().__init__()
        self.backend, self.instance, self.poll_s = backend, name, poll_s
        self._feed: LogFeed | None = None
        self._closed = False
        self._reading = False
        self.lines_shown = 0

    def compose(self) -> ComposeResult:
        yield Header()
        yield RichLog(id="log", max_lines=5000, wrap=False, markup=False, highlight=False, auto_scroll=True)
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = f"{self.instance}: logs (stdout + stderr, following)"
        self._reading = True
        self._open()
        self.set_interval(self.poll_s, self._poll)

    def on_unmount(self) -> None:
        self._closed = True
        if self._feed is not None:
            self._feed.close()

    @work(thread=True, exit_on_error=False, group="logs")
    def _open(self) -> None:
        try:
            feed = self.backend.follow(self.instance)
        except Exception as exc:  # noqa: BLE001 - shown on the screen (no such instance, the API unreachable)
            self.post_message(self.Lines([f"cannot read the log of {self.instance}: {exc}"]))
            return
        self._feed = feed
        if self._closed:  # left before the feed was open
            feed.close()
            return
        self.post_message(self.Lines(feed.read()))

    def _poll(self) -> None:
        if not self._reading and self._feed is not None:
            self._reading = True
            self._read()

    @work(thread=True, exit_on_error=False, group="logs")
    def _read(self) -> None:
        feed = self._feed
        self.post_message(self.Lines(feed.read() if feed is not None else []))

    @on(Lines)
    def _show(self, message: Lines) -> None:
        self._reading = False
        log = self.query_one("#log", RichLog)
        for line in message.lines:
            log.write(Text(line))
        self.lines_shown += len(message.lines)


class ConfirmScreen(ModalScreen[bool]):
    """A yes/no question; dismisses with True only on an explicit yes."""

    BINDINGS = [
        Binding("y", "answer(True)", "Yes"),
        Binding("n,escape", "answer(False)", "No"),
    ]

    def __init__(self, question: str, yes: str = "Yes") -> None:
        super().__init__()
        self.question, self.yes = question, yes

    def compose(self) -> ComposeResult:
        with Grid(id="dialog"):
            yield Label(self.question, id="question")
            yield Button(f"{self.yes} (y)", variant="error", id="yes")
            yield Button("Cancel (n)", variant="primary", id="no")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()  # Enter on the default does nothing harmful

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)

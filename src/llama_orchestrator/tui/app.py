"""`llama-orch dashboard`: every instance at a glance, refreshed in place every second, with start, stop, restart,
health and logs keys; this home's instances, or another node's through its daemon's API (`--host`).

The UI thread never touches the instances port: refreshes and actions run in Textual thread workers
(``tui.data.Backend`` blocks), which post messages back; the handlers only update widgets. The table is updated
cell by cell, so the cursor stays where it is and nothing flickers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.text import Text
from textual import on
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.message import Message
from textual.widgets import DataTable, Footer, Header, RichLog, Static

from llama_orchestrator.domain.errors import OrchestratorError
from llama_orchestrator.domain.states import ACTIVE
from llama_orchestrator.tui.data import COLUMNS, Backend, Cell, InstanceLine, Snapshot
from llama_orchestrator.tui.screens import ConfirmScreen, DetailScreen, LogScreen

if TYPE_CHECKING:
    from llama_orchestrator.services.instances_port import InstancesPort

# What a table action is called while it runs, in the notice that it began.
ACTING = {"start": "starting", "stop": "stopping", "restart": "restarting", "health": "probing"}


class InstanceTable(DataTable):
    """The instance table, with its navigation keys shown in the footer."""

    BINDINGS = [
        Binding("up", "cursor_up", "Move", key_display="↑/↓"),
        Binding("down", "cursor_down", "Down", show=False),
        Binding("enter", "select_cursor", "Detail", key_display="⏎"),
    ]


class SnapshotReady(Message):
    def __init__(self, snapshot: Snapshot | None, error: str | None = None) -> None:
        super().__init__()
        self.snapshot, self.error = snapshot, error


class ActionDone(Message):
    def __init__(self, verb: str, name: str, message: str, ok: bool) -> None:
        super().__init__()
        self.verb, self.name, self.message, self.ok = verb, name, message, ok


class DashboardApp(App[None]):
    TITLE = "llama-orchestrator"
    SUB_TITLE = "dashboard"
    CSS = """
    #notice { height: auto; padding: 0 1; }
    #notice.off { background: $warning 20%; color: $text; }
    #notice.on { color: $text-muted; }
    #notice.error { background: $error 30%; }
    #instances { height: 1fr; }
    #events { height: 11; border: round $panel-lighten-2; border-title-color: $text; }
    ConfirmScreen { align: center middle; }
    #dialog {
        grid-size: 2; grid-gutter: 1 2; grid-rows: auto 3; padding: 1 2; width: 64; height: auto;
        border: thick $error 60%; background: $surface;
    }
    #question { column-span: 2; width: 1fr; content-align: center middle; }
    #dialog Button { width: 100%; }
    """
    BINDINGS = [
        Binding("q", "quit", "Quit"),
        Binding("r", "refresh", "Refresh"),
        Binding("s", "start_selected", "Start"),
        Binding("d", "stop_selected", "Stop"),
        Binding("ctrl+r", "restart_selected", "Restart"),  # not a letter: R is refresh
        Binding("h", "health_selected", "Health"),
        Binding("l", "logs", "Logs"),
    ]
    TABLE_ACTIONS = frozenset(
        {"refresh", "start_selected", "stop_selected", "restart_selected", "health_selected", "logs"}
    )

    def __init__(self, backend: Backend, refresh_s: float = 1.0) -> None:
        super().__init__()
        self.backend = backend
        self.refresh_s = refresh_s
        self.lines: dict[str, InstanceLine] = {}
        self.busy: set[str] = set()  # instances with a start or stop in flight
        self.refreshes = 0  # snapshots applied so far (tests wait on it)
        self._last_event_id = 0
        self._refreshing = False
        self._refresh_again = False
        self._quit_when_idle = False

    def compose(self) -> ComposeResult:
        # Kept as attributes: refreshes land while a detail or log screen is on top, where queries would not
        # find the main screen's widgets.
        self.notice = Static("reading state…", id="notice")
        self.table = InstanceTable(id="instances", cursor_type="row", cursor_foreground_priority="renderable")
        self.event_log = RichLog(id="events", max_lines=500, wrap=False, markup=False, highlight=False)
        yield Header()
        yield self.notice
        yield self.table
        yield self.event_log
        yield Footer()

    def on_mount(self) -> None:
        for key, heading in COLUMNS:
            self.table.add_column(heading, key=key)
        self.event_log.border_title = "Recent events"
        self.table.focus()
        self.action_refresh()
        self.set_interval(self.refresh_s, self.action_refresh)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        # Start, stop, restart, health, logs and refresh act on the table's selection: only while the table is on
        # screen.
        return not (action in self.TABLE_ACTIONS and len(self.screen_stack) > 1)

    # -- refresh -------------------------------------------------------------------------------------------------

    def action_refresh(self) -> None:
        # One refresh at a time: a slow one (many instances, a slow disk) is followed by one more, never queued up.
        if self._refreshing:
            self._refresh_again = True
            return
        self._refreshing = True
        self.run_worker(self._load_snapshot, thread=True, group="refresh", exit_on_error=False)

    def _load_snapshot(self) -> None:
        try:
            self.post_message(SnapshotReady(self.backend.snapshot(self._last_event_id)))
        except Exception as exc:  # noqa: BLE001 - shown in the notice line; the next refresh tries again
            self.post_message(SnapshotReady(None, f"could not read the state: {exc}"))

    @on(SnapshotReady)
    def _apply_snapshot(self, message: SnapshotReady) -> None:
        self._refreshing = False
        notice = self.notice
        if message.snapshot is None:
            notice.update(Text(message.error or "?"))
            notice.set_classes("error")
        else:
            snapshot = message.snapshot
            self._apply_lines(snapshot.lines)
            self._apply_events(snapshot)
            notice.update(Text(snapshot.notice))
            notice.set_classes("on" if snapshot.daemon else "off")
            self.refreshes += 1
        if self._refresh_again:
            self._refresh_again = False
            self.action_refresh()

    def _apply_lines(self, lines: tuple[InstanceLine, ...]) -> None:
        """Update the table in place: changed cells only; rows added and removed as instances come and go."""
        table = self.table
        keys = [key for key, _ in COLUMNS]
        seen = set()
        for line in lines:
            seen.add(line.name)
            old = self.lines.get(line.name)
            if old is None:
                table.add_row(*(_text(cell) for cell in line.cells), key=line.name)
            else:
                for key, before, after in zip(keys, old.cells, line.cells, strict=True):
                    if before != after:
                        table.update_cell(line.name, key, _text(after), update_width=True)
            self.lines[line.name] = line
        for name in set(self.lines) - seen:
            table.remove_row(name)
            del self.lines[name]

    def _apply_events(self, snapshot: Snapshot) -> None:
        log = self.event_log
        for event in snapshot.events:
            text = Text(f"{event.time}  ")
            text.append(f"{event.instance:<16} ", style="bold")
            text.append(f"{event.kind:<13}", style=event.style)
            text.append(event.message)
            log.write(text)
            self._last_event_id = max(self._last_event_id, event.id)

    # -- actions -------------------------------------------------------------------------------------------------

    def selected(self) -> str | None:
        table = self.table
        if table.row_count == 0:
            return None
        return table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value

    def _selected_or_warn(self) -> str | None:
        name = self.selected()
        if name is None:
            self.notify("No instance selected (create one with `llama-orch init`).", severity="warning")
        elif name in self.busy:
            self.notify(f"{name}: a start or stop is already in progress.", severity="warning")
            return None
        return name

    def action_start_selected(self) -> None:
        name = self._selected_or_warn()
        if name is None:
            return
        line = self.lines.get(name)
        if line is not None and line.status in ACTIVE:
            self.notify(f"{name} is already {line.status}.")
            return
        self._act("start", name)

    def action_stop_selected(self) -> None:
        name = self._selected_or_warn()
        if name is None:
            return
        line = self.lines.get(name)
        if line is not None and line.status == "stopped":
            self.notify(f"{name} is already stopped.")
            return

        def answered(yes: bool | None) -> None:
            if yes:
                self._act("stop", name)

        question = f"Stop {name}?\nIt is asked to exit, and killed after {self.backend.stop_timeout:g} s."
        self.push_screen(ConfirmScreen(question, yes="Stop"), answered)

    def _act(self, verb: str, name: str) -> None:
        self.busy.add(name)
        self.notify(f"{ACTING[verb]} {name}…", timeout=3)
        call = {"start": self.backend.start, "stop": self.backend.stop, "restart": self.backend.restart}[verb]

        def work() -> None:
            try:
                self.post_message(ActionDone(verb, name, call(name), True))
            except OrchestratorError as exc:
                self.post_message(ActionDone(verb, name, str(exc), False))
            except Exception as exc:  # noqa: BLE001 - a bug must not end the dashboard; show it instead
                self.post_message(ActionDone(verb, name, f"{verb} {name} failed unexpectedly: {exc!r}", False))

        self.run_worker(work, thread=True, group="actions", exit_on_error=False)
        self.action_refresh()  # show `stopping` while the stop waits for the process

    def action_restart_selected(self) -> None:
        name = self._selected_or_warn()
        if name is None:
            return

        def answered(yes: bool | None) -> None:
            if yes:
                self._act("restart", name)

        question = (
            f"Restart {name}?\nIt is asked to exit (killed after {self.backend.stop_timeout:g} s), then started again."
        )
        self.push_screen(ConfirmScreen(question, yes="Restart"), answered)

    def action_health_selected(self) -> None:
        """Probe the selected instance now (`llama-orch health NAME`); the answer shows as a notification."""
        name = self.selected()
        if name is None:
            return
        self.notify(f"{ACTING['health']} {name}…", timeout=2)

        def work() -> None:
            try:
                self.post_message(ActionDone("health", name, self.backend.health(name), True))
            except Exception as exc:  # noqa: BLE001 - shown, as a failed start is
                self.post_message(ActionDone("health", name, f"health of {name}: {exc}", False))

        self.run_worker(work, thread=True, group="actions", exit_on_error=False)

    @on(ActionDone)
    def _action_done(self, message: ActionDone) -> None:
        if message.verb != "health":  # a probe does not hold the instance: a start or stop may be in flight
            self.busy.discard(message.name)
        self.notify(message.message, severity="information" if message.ok else "error", timeout=4 if message.ok else 12)
        if self._quit_when_idle and not self.busy:
            self.exit()
        self.action_refresh()

    async def action_quit(self) -> None:
        # A start or stop in flight finishes either way (its thread is not interrupted): wait for it on screen rather
        # than on a blank terminal. A second Q quits at once.
        if self.busy and not self._quit_when_idle:
            self._quit_when_idle = True
            names = ", ".join(sorted(self.busy))
            self.notify(f"Quitting once {names} is done (Q again to quit now).", timeout=15)
            return
        self.exit()

    @on(DataTable.RowSelected)
    def _open_detail(self, event: DataTable.RowSelected) -> None:
        self.push_screen(DetailScreen(self.backend, str(event.row_key.value), self.refresh_s))

    def action_logs(self) -> None:
        name = self.selected()
        if name is not None:
            self.push_screen(LogScreen(self.backend, name))


def _text(cell: Cell) -> Text:
    return Text(cell.text, style=cell.style, no_wrap=True)


def dashboard_app(port: InstancesPort, *, same_machine: bool, refresh_s: float = 1.0) -> DashboardApp:
    """The dashboard over ``port`` (``cli.commands.instances()``). ``same_machine``: the instances' processes are
    this machine's (no ``--host``), so their CPU and memory can be measured here."""
    return DashboardApp(Backend(port, same_machine=same_machine), refresh_s=refresh_s)


def run_dashboard(port: InstancesPort, *, same_machine: bool, refresh_s: float = 1.0) -> None:
    """Run the dashboard in this terminal until the person quits (Q)."""
    dashboard_app(port, same_machine=same_machine, refresh_s=refresh_s).run()

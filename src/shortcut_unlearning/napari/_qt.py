"""Small Qt building blocks the dock is made of."""

from __future__ import annotations

from qtpy.QtCore import QSize, Qt
from qtpy.QtWidgets import (
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSizePolicy,
    QToolButton,
    QVBoxLayout,
    QWidget,
)


def section(title: str, rows) -> QGroupBox:
    box = QGroupBox(title)
    layout = QFormLayout(box) if rows and isinstance(rows[0], tuple) else QVBoxLayout(box)
    for row in rows:
        if isinstance(row, tuple):
            layout.addRow(*row)
        else:
            layout.addWidget(row)
    return box


def row(*widgets) -> QWidget:
    holder = QWidget()
    layout = QHBoxLayout(holder)
    layout.setContentsMargins(0, 0, 0, 0)
    for widget in widgets:
        layout.addWidget(widget)
    return holder


def button(text: str, slot, tip: str = "") -> QPushButton:
    button = QPushButton(text, toolTip=tip)
    button.clicked.connect(lambda *_: slot())
    return button


class WrappedText(QLabel):
    """Wrapped text as tall as its width needs. A plain wrapped QLabel asks for the height its
    text takes at a narrow guessed width (five times too tall in a 300 px dock), and the
    space it gets beyond its lines shows as blank gaps."""

    def _fitted(self, hint: QSize) -> QSize:
        width = self.width()
        return QSize(hint.width(), self.heightForWidth(width)) if width > 0 else hint

    def sizeHint(self) -> QSize:
        return self._fitted(super().sizeHint())

    def minimumSizeHint(self) -> QSize:
        return self._fitted(super().minimumSizeHint())

    def resizeEvent(self, event) -> None:
        super().resizeEvent(event)
        self.updateGeometry()  # a new width asks for a new height


def text(text: str, tip: str = "") -> QLabel:
    label = WrappedText(text, toolTip=tip, wordWrap=True)
    label.setTextFormat(Qt.TextFormat.AutoText)
    # Wrapped text takes the dock's width and the height it needs, never a wider dock.
    label.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Minimum)
    label.setMinimumWidth(40)
    return label


def expander(title: str, tip: str = "") -> tuple[QToolButton, QLabel]:
    """A "title" button with an arrow, and the wrapped text it shows or hides (hidden first):
    the numbers one click away from the plain words."""
    details = text("")
    details.setVisible(False)
    toggle = QToolButton(text=title, checkable=True, toolTip=tip, autoRaise=True)
    toggle.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextBesideIcon)
    toggle.setArrowType(Qt.ArrowType.RightArrow)

    def show(shown: bool) -> None:
        details.setVisible(shown)
        toggle.setArrowType(Qt.ArrowType.DownArrow if shown else Qt.ArrowType.RightArrow)

    toggle.toggled.connect(show)
    return toggle, details


def duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"

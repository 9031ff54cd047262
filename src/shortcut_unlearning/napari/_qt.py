"""Small Qt building blocks the dock is made of."""

from __future__ import annotations

from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSizePolicy,
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


def text(text: str, tip: str = "") -> QLabel:
    label = QLabel(text, toolTip=tip, wordWrap=True)
    label.setTextFormat(Qt.TextFormat.AutoText)
    # Wrapped text takes the dock's width and the height it needs, never a wider dock.
    label.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Minimum)
    label.setMinimumWidth(40)
    return label


def duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"

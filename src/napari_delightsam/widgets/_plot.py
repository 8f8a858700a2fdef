"""A tiny live plot (QPainter, no plotting library): training loss per step, validation Dice per epoch."""

from __future__ import annotations

from typing import Any

from qtpy.QtCore import QPointF, QRectF, Qt
from qtpy.QtGui import QColor, QPainter, QPainterPath, QPen
from qtpy.QtWidgets import QSizePolicy, QWidget


class LossPlot(QWidget):
    """Two series on a shared x axis (optimizer steps): loss (left scale), val Dice (0..1, right)."""

    LOSS_COLOR = QColor(90, 170, 255)
    DICE_COLOR = QColor(255, 170, 60)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.loss: list[tuple[float, float]] = []
        self.dice: list[tuple[float, float]] = []
        self.setMinimumHeight(110)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.setToolTip("blue: training loss per step · orange: validation Dice per epoch (0-1)")

    def clear(self) -> None:
        self.loss.clear()
        self.dice.clear()
        self.update()

    def add_loss(self, step: float, value: float) -> None:
        self.loss.append((float(step), float(value)))
        self.update()

    def add_dice(self, step: float, value: float) -> None:
        self.dice.append((float(step), float(value)))
        self.update()

    def paintEvent(self, event: Any) -> None:  # noqa: N802 (Qt name)
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        rect = QRectF(self.rect()).adjusted(34, 6, -30, -16)
        painter.setPen(QPen(QColor(128, 128, 128), 1))
        painter.drawRect(rect)
        xs = [x for x, _ in self.loss] + [x for x, _ in self.dice]
        if not xs:
            painter.drawText(rect, Qt.AlignmentFlag.AlignCenter, "loss / validation Dice appear here")
            painter.end()
            return
        x0, x1 = min(xs), max(xs)
        x1 = x1 if x1 > x0 else x0 + 1
        lmax = max((v for _, v in self.loss), default=1.0) or 1.0

        def px(x: float) -> float:
            return rect.left() + (x - x0) / (x1 - x0) * rect.width()

        def series(points: list[tuple[float, float]], top: float, color: QColor) -> None:
            if not points:
                return
            path = QPainterPath()
            for i, (x, y) in enumerate(points):
                pt = QPointF(px(x), rect.bottom() - max(0.0, min(y / top, 1.0)) * rect.height())
                path.moveTo(pt) if i == 0 else path.lineTo(pt)
                if len(points) == 1 or color == self.DICE_COLOR:
                    painter.setPen(QPen(color, 4))
                    painter.drawPoint(pt)
            painter.setPen(QPen(color, 1.6))
            painter.drawPath(path)

        series(self.loss, lmax, self.LOSS_COLOR)
        series(self.dice, 1.0, self.DICE_COLOR)
        painter.setPen(self.LOSS_COLOR)
        painter.drawText(QRectF(0, rect.top() - 4, 32, 14), Qt.AlignmentFlag.AlignRight, f"{lmax:.2g}")
        painter.drawText(QRectF(0, rect.bottom() - 10, 32, 14), Qt.AlignmentFlag.AlignRight, "0")
        painter.setPen(self.DICE_COLOR)
        painter.drawText(QRectF(rect.right() + 3, rect.top() - 4, 28, 14), Qt.AlignmentFlag.AlignLeft, "1")
        painter.drawText(QRectF(rect.right() + 3, rect.bottom() - 10, 28, 14), Qt.AlignmentFlag.AlignLeft, "0")
        painter.setPen(QColor(150, 150, 150))
        painter.drawText(QRectF(rect.left(), rect.bottom() + 1, rect.width(), 14), Qt.AlignmentFlag.AlignCenter,
                         f"step {int(x0)}–{int(x1)}")
        painter.end()

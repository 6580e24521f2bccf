"""The JSON-structure-aware stop rule: a row ends as soon as its first top-level JSON object closes."""

from __future__ import annotations


class JsonScanner:
    """Tracks brace depth outside JSON strings (with escapes) from the first '{' on."""

    __slots__ = ("closed", "depth", "escape", "in_string")

    def __init__(self) -> None:
        self.depth, self.in_string, self.escape, self.closed = 0, False, False, False

    def feed(self, text: str) -> bool:
        """Consume text; True once the first top-level object has closed."""
        if self.closed:
            return True
        for ch in text:
            if self.depth == 0:  # before the object: only its opening brace matters
                if ch == "{":
                    self.depth = 1
                continue
            if self.in_string:
                if self.escape:
                    self.escape = False
                elif ch == "\\":
                    self.escape = True
                elif ch == '"':
                    self.in_string = False
            elif ch == '"':
                self.in_string = True
            elif ch == "{":
                self.depth += 1
            elif ch == "}":
                self.depth -= 1
                if self.depth == 0:
                    self.closed = True
                    return True
        return False

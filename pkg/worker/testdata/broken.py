import snakepit

raise ImportError("this adapter is broken on purpose")

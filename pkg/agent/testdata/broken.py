from snakepit import tool

import no_such_module_anywhere  # fails on purpose


@tool
def never():
    return None

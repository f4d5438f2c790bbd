"""Ground floor: token constants shared by models/, data/, training/ and the tasks (imports nothing
from jaxlisa). Values are LLaVA's / LISA's (`llava/constants.py`, LISA `utils/utils.py`)."""

IGNORE_INDEX = -100  # label of a position the loss skips (PyTorch CrossEntropyLoss's ignore_index)
IMAGE_TOKEN_INDEX = -200  # LLaVA's placeholder id for one "<image>" before the collate expands it
DEFAULT_IMAGE_TOKEN = "<image>"
DEFAULT_IMAGE_PATCH_TOKEN = "<im_patch>"
DEFAULT_IM_START_TOKEN = "<im_start>"
DEFAULT_IM_END_TOKEN = "<im_end>"
DEFAULT_SEG_TOKEN = "[SEG]"

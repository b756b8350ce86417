"""medcap: medical image captioning, report generation and VQA with multimodal LLMs on torchtune."""

__version__ = "0.1.0"

"""The OpenVINO side: ONNX -> IR (``compile.py``), NNCF quantization (``quantize.py``), the C++
extension and its loader (``extension/``), and what the runtime does to an IR at load: the two-stage
split (``stages.py``), the row kernel in place of the table Gather (``row_kernel.py``) and tables mapped
from their files (``tables.py``)."""

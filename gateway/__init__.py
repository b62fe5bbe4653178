"""modelarts-gateway: a local OpenAI-style gateway in front of Huawei Cloud ModelArts."""

"""The vLLM replica: engine arguments per profile, speculation statistics, the local model store."""

